"""The front door holds: every Python example in README.md and docs/ runs, every link lands.

The fenced ``python`` blocks of one page run in order, in one namespace, as a reader would
type them, in a fresh directory holding the stand-ins the pages assume: ``dataset`` and
``val_dataset`` (map-style), ``ds_a``/``ds_b`` and ``loader_a``/``loader_b`` (several loaders),
``loader``, ``epochs``, ``train_step`` and ``heads`` (a training loop), a JPEG folder at
``data/train`` and HDF5 files at ``data/train*.h5``; profiles go to a temporary directory.
Two things are changed for the suite's time: a tuning budget (``budget_s=N``) becomes
3 s and Lightning trains one epoch. A block under ``<!-- example: skip, REASON -->`` is
skipped with that reason; ``<!-- example: cuda -->`` runs only where CUDA is.
"""

from __future__ import annotations

import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import autotune

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!--\s*example:\s*(skip|cuda)\b,?\s*(.*?)\s*-->\s*$")
FOR_THE_SUITE = [(re.compile(r"\bbudget_s=\d+"), "budget_s=3"),
                 (re.compile(r"\bmax_epochs=\d+"), "max_epochs=1")]


def python_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, why it is skipped or None) for every ``python`` block of a page."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        skip = None
        if mark and mark.group(1) == "skip":
            skip = mark.group(2) or "marked skip"
        elif mark and mark.group(1) == "cuda" and not torch.cuda.is_available():
            skip = "needs CUDA"
        blocks.append((line + 1, match.group(2), skip))
    return blocks


def _jpeg_folder(root: Path, classes: int = 2, per_class: int = 150) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40 + i % 9, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)


def _hdf5_files(data: Path) -> None:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    for part in range(2):
        with h5py.File(data / f"train{part}.h5", "w") as f:
            f.create_dataset("particles", data=rng.normal(size=(1024, 4, 3)).astype("float32"),
                             chunks=(64, 4, 3), compression="gzip")
            f.create_dataset("label", data=rng.integers(0, 2, 1024), chunks=(64,))


def _train_step(*batch):
    time.sleep(0.002)


@pytest.fixture
def reader(tmp_path, monkeypatch):
    """A fresh directory with the stand-ins, and the namespace a page's blocks share."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path / "profiles"))
    (tmp_path / "data").mkdir()
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(2048, 8, generator=generator),
                            torch.randn(2048, 1, generator=generator))
    val_dataset = TensorDataset(torch.randn(512, 8), torch.randn(512, 1))
    page = types.ModuleType("doc_example")   # what a page defines pickles, as in a module
    monkeypatch.setitem(sys.modules, page.__name__, page)
    namespace = vars(page)
    namespace.update({
        "autotune": autotune,
        "factory": autotune.OptimalDataLoaderFactory(),
        "dataset": dataset, "val_dataset": val_dataset,
        "ds_a": TensorDataset(torch.randn(640, 8)), "ds_b": TensorDataset(torch.randn(384, 4)),
        "loader": DataLoader(dataset, batch_size=64),
        "loader_a": DataLoader(TensorDataset(torch.randn(96, 8)), batch_size=32),
        "loader_b": DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=32),
        "heads": {"images": lambda batch: batch, "text": lambda batch: batch},
        "epochs": 2, "train_step": _train_step,
    })
    return namespace


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_runs(page, reader, tmp_path):
    blocks = python_blocks(page)
    text = page.read_text()
    if "data/train\"" in text or "data/train'" in text:
        _jpeg_folder(tmp_path / "data" / "train")
    if "data/train*.h5" in text:
        _hdf5_files(tmp_path / "data")
    skipped = []
    for line, code, skip in blocks:
        if skip:
            skipped.append(f"line {line}: {skip}")
            continue
        for pattern, shorter in FOR_THE_SUITE:
            code = pattern.sub(shorter, code)
        where = f"{page.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), reader)
        except Exception as error:
            pytest.fail(f"the example at {where} raised {type(error).__name__}: {error}")
        for value in list(reader.values()):   # the page's loaders let their workers go
            if type(value).__module__.startswith("autotune.") and hasattr(value, "close"):
                value.close()
    assert blocks or page.name != "README.md", "the README has no Python example"
    if skipped:
        print(f"{page.name}: skipped " + "; ".join(skipped))


def test_the_collector_sees_marks_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n```bash\nls\n```\n\n"
                    "<!-- example: skip, needs a dataset path -->\n```python\nb = 2\n```\n"
                    "<!-- example: cuda -->\n```python\nc = 3\n```\n")
    blocks = python_blocks(page)
    assert [code for _, code, _ in blocks] == ["a = 1\n", "b = 2\n", "c = 3\n"]
    assert blocks[0][2] is None and blocks[1][2] == "needs a dataset path"
    assert blocks[2][2] == (None if torch.cuda.is_available() else "needs CUDA")
    assert blocks[0][0] == 4   # the block's first line of code, for the failure message


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.*)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_lands(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue   # a web address: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_readme_is_short_and_reaches_every_topic():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 200
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    topics = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert topics - linked == set(), "docs the README does not link"


def test_the_command_line_page_names_every_option():
    """The usage block of docs/cli.md lists every command with exactly its parser's options."""
    from autotune.cli import _parser

    parser = _parser()
    usage = next(m.group(2) for m in FENCE.finditer((ROOT / "docs" / "cli.md").read_text())
                 if m.group(1) == "bash")
    written: dict[str, str] = {}
    command = None
    for line in usage.splitlines():
        line = line.split("#")[0]
        started = re.match(r"autotune (\w+)", line)
        if started:
            command = started.group(1)
            written[command] = line
        elif line.startswith(" ") and command:
            written[command] += line
        else:
            command = None
    commands = parser._subparsers._group_actions[0].choices
    assert set(written) == set(commands), "commands the page lists"
    for name, sub in commands.items():
        options = {flag for action in sub._actions for flag in action.option_strings
                   if flag.startswith("--") and flag != "--help"}
        assert set(re.findall(r"(--[a-z][a-z-]*)", written[name])) == options, name
    top = {flag for action in parser._actions for flag in action.option_strings
           if flag.startswith("--") and flag != "--help"}
    assert top <= set(re.findall(r"(--[a-z][a-z-]*)", usage)), "the command's own options"
