#!/usr/bin/env bash
# Lint (ruff) and type-check (mypy: the whole package, strict for the pure decisions and the
# records), as CI runs them.
# Settings are in pyproject.toml.
source "$(dirname "$0")/env.sh"
ruff check autotune tests bench examples scripts
mypy
