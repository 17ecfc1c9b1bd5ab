"""Every exported class and function says what each of its arguments is.

Google style: an ``Args:`` section (``Attributes:`` for a dataclass, whose fields are its
arguments) naming every parameter of the call, so ``help(autotune.X)`` is enough to use X.
"""

from __future__ import annotations

import inspect
import re

import pytest

import autotune


def _documented(obj) -> tuple[str, list[inspect.Parameter]]:
    """The docstring a user reads (class and ``__init__``) and the parameters a call takes."""
    text = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__init__" in vars(obj):
        text += "\n" + (inspect.getdoc(obj.__init__) or "")
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        params = []
    return text, [p for p in params if p.name not in ("self", "cls")]


def _sections(text: str) -> str:
    """The ``Args:`` and ``Attributes:`` sections: from the heading to the next heading."""
    found = re.findall(r"^(?:Args|Attributes):\n((?:[ \t]+.*\n?|\n)*)", text, re.MULTILINE)
    return "\n".join(found)


CALLABLES = sorted(
    name for name in autotune.__all__
    if callable(getattr(autotune, name))
    and not (inspect.isclass(getattr(autotune, name))
             and issubclass(getattr(autotune, name), BaseException)
             and "__init__" not in vars(getattr(autotune, name))))  # their own arguments only


@pytest.mark.parametrize("name", CALLABLES)
def test_every_argument_is_documented(name):
    obj = getattr(autotune, name)
    text, params = _documented(obj)
    assert text and not text.startswith(f"{name}("), f"{name} has only a generated docstring"
    sections = _sections(text)
    missing = [p.name for p in params
               if not re.search(rf"^\s+(?:\w+, )*\**{re.escape(p.name)}\b", sections, re.MULTILINE)]
    assert not missing, f"{name}: no Args:/Attributes: entry for {missing}"


def test_the_check_sees_a_missing_argument():
    def documented(a, b):
        """Adds.

        Args:
            a: the first.
        """

    text, _ = _documented(documented)
    sections = _sections(text)
    assert re.search(r"^\s+a\b", sections, re.MULTILINE)
    assert not re.search(r"^\s+b\b", sections, re.MULTILINE)
