"""Shared fixtures: every test gets its own profile directory, never ./profiles."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path / "profiles"))
    monkeypatch.chdir(tmp_path)
    import autotune.factory.factory

    monkeypatch.setattr(autotune.factory.factory.OptimalDataLoaderFactory, "_default", None)
