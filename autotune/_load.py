"""``MODULE:CALLABLE`` -> the dataset, for ``autotune tune`` (like ``uvicorn app:app``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .errors import AutotuneError

EXAMPLE = "examples/datasets.py:make_dataset or mypkg.data:make_dataset"


def load_dataset(target: str) -> Any:
    """Import MODULE (a dotted name, or a path to a .py file), call CALLABLE, return the result."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise AutotuneError(f"target {target!r} must look like MODULE:CALLABLE, e.g. {EXAMPLE}")
    module = _import(module_name)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise AutotuneError(f"{module_name} has no attribute {attr!r}") from None
    if not callable(obj) or hasattr(obj, "__getitem__"):
        return obj  # already a dataset
    try:
        return obj()
    except Exception as exc:
        raise AutotuneError(f"{target}() raised {type(exc).__name__}: {exc}") from exc


def _import(name: str) -> Any:
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise AutotuneError(f"no such file: {path}")
        sys.path.insert(0, str(path.resolve().parent))  # its sibling imports work
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise AutotuneError(f"{path} is not a Python file: MODULE must be a .py file or "
                                "a dotted module name")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # workers started by spawn find its classes by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise AutotuneError(f"importing {path} raised {type(exc).__name__}: {exc}") from exc
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise AutotuneError(f"cannot import {name!r}: {exc}") from exc
    except Exception as exc:  # a relative name ("TypeError"), or the module's own error
        raise AutotuneError(f"importing {name!r} raised {type(exc).__name__}: {exc}") from exc
