"""Mid-epoch resume (torchdata's StatefulDataLoader protocol) on every loader the factory
returns: ``state = loader.state_dict()`` is small plain data counting the batches the consumer
received; a new loader's ``load_state_dict(state)`` makes its next ``iter()`` yield the rest of
that epoch, then whole epochs, bit for bit the uninterrupted run's (random augmentations
included, whatever the worker count, with a factory seed).

One contract check, ``assert_resumes``, runs over every case."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset, IterableDataset

from autotune import InvalidConfigError, OptimalDataLoaderFactory

from datasets import Stream
from test_builder import only_this_tests_processes, workers_alive  # noqa: F401

HERE = Path(__file__).resolve().parent
SIZE, BATCH = 42, 4  # training: 10 full batches an epoch (2 samples dropped); validation: 11
SEED = 0
PLAIN = (dict, list, str, int, float, bool, type(None))

# 3 workers on a 2-CPU machine: torch warns about an explicit count, as it should
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


class Noisy(Dataset):
    """Sample i is [i, torch.rand(), random.random(), np.random.rand()], drawn from the
    global generators of whichever process loads it: nothing here seeds them, so only the
    factory's seed can make two runs (and a resumed run) draw the same augmentations."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), torch.rand(()).item(), random.random(),
                             float(np.random.rand())], dtype=torch.float64)


class StatefulStream(IterableDataset):
    """A stream that resumes itself (torchdata's protocol on the dataset): epoch e yields
    tensor([1000 * e + i]) for i in a permutation seeded by e. ``given`` holds every state
    it returned, ``loaded`` every state it was given."""

    def __init__(self, size: int = 30) -> None:
        self.size = size
        self.epoch, self.position = 0, 0
        self.given: list[dict] = []
        self.loaded: list[dict] = []

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch))
        while self.position < self.size:
            item = int(order[self.position])
            self.position += 1
            yield torch.tensor([1000 * self.epoch + item])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position}
        self.given.append(dict(state))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(dict(state))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def factory() -> OptimalDataLoaderFactory:
    return OptimalDataLoaderFactory(measure=False, seed=SEED)


def training(num_workers: int = 2, size: int = SIZE, **keywords: Any) -> Callable[[], Any]:
    """A maker of the factory's training loader over ``Noisy(size)``."""
    def make() -> Any:
        return factory().create_training_loader(Noisy(size), BATCH, num_workers=num_workers,
                                                **keywords)
    return make


def validation(num_workers: int = 2, size: int = SIZE, **keywords: Any) -> Callable[[], Any]:
    def make() -> Any:
        return factory().create_validation_loader(Noisy(size), BATCH, num_workers=num_workers,
                                                  **keywords)
    return make


# -- the contract, written once ------------------------------------------------------------------


def check_plain(value: Any, where: str = "state") -> None:
    """Only dict/list/str/int/float/bool/None, all the way down."""
    assert isinstance(value, PLAIN), f"{where} is a {type(value).__name__}: {value!r:.200}"
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")


def take_state(loader: Any) -> dict:
    """``loader.state_dict()``, checked as a checkpoint needs it, after a round trip through
    ``torch.save`` / ``torch.load(weights_only=True)`` (what resumes is what a file holds)."""
    state = loader.state_dict()
    assert isinstance(state, dict), state
    assert "version" in state, sorted(state)
    check_plain(state)
    assert len(repr(state)) < 10_000, f"{len(repr(state))} characters: {state!r:.300}"
    assert yaml.safe_load(yaml.safe_dump(state)) == state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded == state
    return loaded


def run_epochs(make_loader: Callable[[], Any], epochs: int) -> list[list[Any]]:
    """The uninterrupted run: a fresh loader, ``epochs`` whole passes, then closed."""
    loader = make_loader()
    try:
        return [list(loader) for _ in range(epochs)]
    finally:
        loader.close()


def same_batch(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same_batch(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same_batch(a[k], b[k]) for k in a))
    return a == b


def assert_same_batches(got: Sequence[Any], want: Sequence[Any],
                        labels: Sequence[str] | None = None) -> None:
    labels = labels or [f"batch {i}" for i in range(len(want))]
    for i, (a, b) in enumerate(zip(got, want)):
        assert same_batch(a, b), f"{labels[i]} differs:\n got {a!r}\nwant {b!r}"
    assert len(got) == len(want), f"{len(got)} batches delivered, the uninterrupted run " \
                                  f"{len(want)}"


Stop = tuple[int, "int | str"]


def assert_resumes(make_loader: Callable[[], Any], *, epochs: int = 3,
                   stops: Sequence[Stop] = ((1, 4),),
                   resume: Callable[[], Any] | Sequence[Callable[[], Any]] | None = None,
                   load_after_a_batch: bool = False,
                   reference: list[list[Any]] | None = None) -> list[dict]:
    """The contract. ``make_loader()`` runs ``epochs`` uninterrupted (the reference), then
    again, stopping at each of ``stops`` in turn: there ``state_dict()`` is taken and the
    loader closed, and a NEW loader (``resume``: a maker, or one per stop; default
    ``make_loader``) loads the state and goes on to the next stop or the end. The batches
    delivered across all of them must be the reference's, exactly and in order.

    A stop ``(e, k)``: ``k`` an int, after the k-th batch of epoch e was received, its
    iterator still alive (0: ``iter()`` made, nothing received yet; the epoch's length: after
    its last batch, before StopIteration); ``"end"``: after epoch e's iterator ended;
    ``"before"``: before epoch e's ``iter()`` (for epoch 0, a loader never iterated).
    ``load_after_a_batch``: each resumed loader first yields a batch of its own, then loads
    the state (which must win at the next ``iter()``). Returns the states taken."""
    reference = reference if reference is not None else run_epochs(make_loader, epochs)
    lengths = [len(epoch) for epoch in reference]
    assert len(set(lengths)) == 1 and lengths[0] > 0, lengths
    if resume is None or callable(resume):
        resume = [resume or make_loader] * len(stops)
    assert len(resume) == len(stops)
    makers = [make_loader, *resume]

    delivered: list[Any] = []
    labels: list[str] = []
    states: list[dict] = []
    epoch, k = 0, 0  # where the next batch comes from
    for number, stop in enumerate([*stops, None]):
        assert stop is None or stop[0] < epochs, stop
        loader = makers[number]()
        try:
            if states:
                if load_after_a_batch:
                    early = iter(loader)
                    next(early)  # a batch of this loader's own first epoch: not delivered
                loader.load_state_dict(states[-1])
            taken = False
            while epoch < epochs and not taken:
                if stop == (epoch, "before"):
                    states.append(take_state(loader))
                    taken = True
                    break
                batches = iter(loader)
                if stop == (epoch, 0):
                    states.append(take_state(loader))
                    taken = True
                    break
                for batch in batches:
                    delivered.append(batch)
                    labels.append(f"segment {number}: epoch {epoch} batch {k}")
                    k += 1
                    if stop == (epoch, k):
                        states.append(take_state(loader))
                        taken = True
                        break
                if taken:
                    if k == lengths[epoch]:  # after the last batch: the next epoch, whole
                        epoch, k = epoch + 1, 0
                    break
                assert k == lengths[epoch], \
                    f"segment {number}: epoch {epoch} ended after batch {k} of {lengths[epoch]}"
                epoch, k = epoch + 1, 0
                if stop == (epoch - 1, "end"):
                    states.append(take_state(loader))
                    taken = True
            assert stop is None or taken, f"never reached the stop {stop}"
        finally:
            loader.close()
    want = [batch for batches in reference for batch in batches]
    assert_same_batches(delivered, want, labels)
    return states


def assert_reference_is_random(reference: list[list[torch.Tensor]], *, shuffled: bool) -> None:
    """The uninterrupted run is worth comparing with: every sample once an epoch, random
    draws that vary, and (training) a fresh order and fresh augmentations each epoch."""
    epochs = [torch.cat(batches) for batches in reference]
    for samples in epochs:
        indices = samples[:, 0].tolist()
        assert len(set(indices)) == len(indices)
        assert len(set(samples[:, 1:].flatten().tolist())) > len(indices)  # draws vary
    if shuffled:
        assert len({tuple(samples[:, 0].tolist()) for samples in epochs}) == len(epochs)
        first, second = (dict(zip(s[:, 0].tolist(), s[:, 1:].tolist())) for s in epochs[:2])
        assert all(first[i] != second[i] for i in set(first) & set(second))


@pytest.fixture(scope="module")
def training_reference(tmp_path_factory) -> list[list[torch.Tensor]]:
    """The factory's training loader (2 workers), 3 epochs, uninterrupted."""
    with pytest.MonkeyPatch.context() as patch:  # conftest's isolation is per test
        patch.setenv("AUTOTUNE_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
        reference = run_epochs(training(2), 3)
    assert [len(epoch) for epoch in reference] == [10, 10, 10]
    assert_reference_is_random(reference, shuffled=True)
    return reference


@pytest.fixture(autouse=True)
def _every_loader_closed():
    """No worker this test started outlives it (processes other tests left, such as
    multiprocessing's resource tracker, are not this test's)."""
    before = {p.pid for p in workers_alive()}
    yield
    deadline = time.monotonic() + 5
    while (left := [p for p in workers_alive() if p.pid not in before]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


# -- the reference itself ------------------------------------------------------------------------


def test_the_seeded_reference_repeats_and_is_random(training_reference):
    assert_same_batches([b for e in run_epochs(training(2), 3) for b in e],
                        [b for e in training_reference for b in e])


def test_taking_a_state_at_every_batch_changes_nothing(training_reference):
    loader = training(2)()
    try:
        got = []
        for _ in range(3):
            for batch in loader:
                got.append(batch)
                take_state(loader)
            take_state(loader)
    finally:
        loader.close()
    assert_same_batches(got, [b for e in training_reference for b in e])


# -- where it stops ------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [
    (0, "before"), (0, 0), (0, 1), (0, 5), (0, 10), (0, "end"),
    (1, 0), (1, 1), (1, 4), (1, 9), (1, 10), (2, 7), (2, 10),
], ids=lambda stop: f"epoch{stop[0]}-{stop[1]}")
def test_resumes_wherever_it_stopped(stop, training_reference):
    assert_resumes(training(2), stops=[stop], reference=training_reference)


def test_a_100_sample_loader_resumes_with_a_small_state():
    """25 batches an epoch; ``take_state`` holds every state under 10 kB of repr."""
    states = assert_resumes(training(2, size=100), epochs=2, stops=[(0, 13), (1, 24)])
    assert all(len(repr(state)) < 10_000 for state in states)


# -- another loader resumes ----------------------------------------------------------------------


@pytest.mark.parametrize("saved, resumed", [
    (2, 0), (2, 3), (0, 2), (3, 2), (2, 1),
], ids=lambda n: f"{n}w")
def test_another_worker_count_resumes_the_same_batches(saved, resumed, training_reference):
    reference = training_reference if saved == 2 else None
    assert_resumes(training(saved), stops=[(1, 3)], resume=training(resumed),
                   reference=reference)


def test_a_resume_matches_a_reference_of_another_worker_count(training_reference):
    """One sequence for every worker count: 0 workers save and resume, 2 made the reference."""
    assert_resumes(training(0), stops=[(0, 6)], reference=training_reference)


@pytest.mark.parametrize("keywords", [
    dict(prefetch_factor=4), dict(prefetch_factor=1), dict(prefetch_across_epochs=False),
    dict(persistent_workers=False),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_other_prefetch_settings_resume_the_same_batches(keywords, training_reference):
    assert_resumes(training(2), stops=[(1, 5)], resume=training(2, **keywords),
                   reference=training_reference)


def test_saved_without_drawing_ahead_resumed_with_it(training_reference):
    assert_resumes(training(2, prefetch_across_epochs=False, prefetch_factor=1),
                   stops=[(0, 9)], resume=training(2), reference=training_reference)


# -- when the state is loaded --------------------------------------------------------------------


@pytest.mark.parametrize("stop", [(0, 3), (1, 10)], ids=["mid-epoch", "after-last-batch"])
def test_load_after_an_iter_that_yielded_a_batch_the_state_wins(stop, training_reference):
    assert_resumes(training(2), stops=[stop], load_after_a_batch=True,
                   reference=training_reference)


def test_load_after_an_iter_with_no_workers(training_reference):
    assert_resumes(training(2), stops=[(1, 2)], resume=training(0), load_after_a_batch=True,
                   reference=training_reference)


# -- several resumes -----------------------------------------------------------------------------


def test_two_resumes_in_one_epoch(training_reference):
    assert_resumes(training(2), stops=[(1, 2), (1, 6)], reference=training_reference)


def test_three_resumes_in_one_epoch_each_with_its_own_worker_count(training_reference):
    assert_resumes(training(2), stops=[(1, 1), (1, 4), (1, 8)],
                   resume=[training(0), training(3), training(2)],
                   reference=training_reference)


def test_resumes_across_epochs(training_reference):
    assert_resumes(training(2), stops=[(0, 5), (1, "end"), (2, 2)],
                   reference=training_reference)


# -- every kind of loader ------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [(0, 4), (1, 10)], ids=["mid-epoch", "after-last-batch"])
def test_an_adaptive_loader_resumes(stop, training_reference):
    make = training(2, adapt=True, adapt_every=1000)
    loader = make()
    try:
        assert type(loader).__name__ == "AdaptiveLoader"
    finally:
        loader.close()
    assert_resumes(make, stops=[stop], reference=training_reference)


def test_an_adaptive_loader_resumes_with_another_worker_count(training_reference):
    assert_resumes(training(2, adapt=True, adapt_every=1000), stops=[(1, 3)],
                   resume=training(1, adapt=True, adapt_every=1000),
                   reference=training_reference)


def unchanged(batch: Any) -> Any:
    """A device transform that returns the batch: its thread still runs one batch ahead."""
    return batch


@pytest.mark.parametrize("transform", [None, unchanged], ids=["copied", "transformed"])
@pytest.mark.parametrize("adapt", [False, True], ids=["plain", "adaptive"])
def test_a_device_loader_resumes_and_nests_its_loaders_state(adapt, transform,
                                                             training_reference):
    keywords = dict(adapt=True, adapt_every=1000) if adapt else {}
    make = training(2, device="cpu", device_transform=transform, **keywords)
    loader = make()
    try:
        assert type(loader).__name__ == "DeviceLoader"
    finally:
        loader.close()
    states = assert_resumes(make, stops=[(0, 3), (1, 7)], reference=training_reference)
    for state in states:
        assert isinstance(state["loader"], dict) and "version" in state["loader"], state


@pytest.mark.parametrize("stop", [(0, 0), (0, 5), (1, 10), (1, 11), (1, "end")],
                         ids=lambda stop: f"epoch{stop[0]}-{stop[1]}")
def test_a_validation_loader_resumes(stop):
    """In order, the last batch short (42 = 10 x 4 + 2), workers not kept between passes."""
    reference = run_epochs(validation(2), 3)
    assert [len(epoch) for epoch in reference] == [11, 11, 11]
    assert [len(batch) for batch in reference[0]] == [4] * 10 + [2]
    assert_reference_is_random(reference, shuffled=False)
    assert torch.cat(reference[0])[:, 0].tolist() == list(range(SIZE))
    assert_resumes(validation(2), stops=[stop], resume=validation(1), reference=reference)


# -- a new process -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_process_resumes_from_a_file(tmp_path, training_reference):
    """Saved here with torch.save, resumed by ``tests/resume_script.py`` in a new Python."""
    loader = training(2)()
    try:
        batches = iter(loader)
        for _ in range(4):
            next(batches)
        state = take_state(loader)
    finally:
        loader.close()
    state_file, out_file = tmp_path / "state.pt", tmp_path / "batches.pt"
    torch.save(state, state_file)
    done = subprocess.run([sys.executable, str(HERE / "resume_script.py"), str(state_file),
                           str(out_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out_file, weights_only=True)
    assert_same_batches(got, training_reference[0][4:] + training_reference[1])


# -- streams -------------------------------------------------------------------------------------


# A stream has no length: a state taken after its last batch but before its StopIteration
# cannot know the epoch is over, so streams stop mid-epoch or after the epoch's end.


@pytest.mark.parametrize("stop", [(0, 0), (0, 3), (1, 6), (1, "end")],
                         ids=lambda stop: f"epoch{stop[0]}-{stop[1]}")
def test_a_stream_with_its_own_state_is_resumed_through_it(stop):
    """30 items, batches of 4: 7 an epoch (drop_last). The loader hands the dataset's own
    state through, and skips nothing itself: the dataset resumes where it said it was."""
    made: list[StatefulStream] = []

    def make() -> Any:
        made.append(StatefulStream(30))
        return factory().create_training_loader(made[-1], BATCH, num_workers=0)

    reference = run_epochs(make, 3)
    assert [len(e) for e in reference] == [7, 7, 7]
    assert torch.cat(reference[1]).view(-1).tolist()[:3] != [1000, 1001, 1002]  # permuted
    made.clear()
    assert_resumes(make, stops=[stop], reference=reference)
    saver, resumer = made
    assert saver.given, "the loader never asked the dataset for its state"
    assert resumer.loaded == [saver.given[-1]]


@pytest.mark.parametrize("num_workers, stop", [
    (0, (0, 3)), (0, (1, 5)), (0, (0, "end")), (2, (0, 3)), (2, (1, 5)), (2, (1, "end")),
], ids=["0w-epoch0-3", "0w-epoch1-5", "0w-epoch0-end", "2w-epoch0-3", "2w-epoch1-5",
        "2w-epoch1-end"])
def test_a_stream_without_state_skips_what_was_delivered(num_workers, stop):
    """``Stream`` (tests/datasets.py) splits itself by worker and keeps no state: the resumed
    loader replays it and drops the batches already delivered (same worker count)."""
    def make() -> Any:
        return factory().create_training_loader(Stream(26), BATCH, num_workers=num_workers)

    reference = run_epochs(make, 3)
    assert [len(e) for e in reference] == [6, 6, 6]
    assert_resumes(make, stops=[stop], reference=reference)


# -- a state that does not fit -------------------------------------------------------------------


def load_and_draw(loader: Any, state: Any) -> None:
    """The state refused by ``load_state_dict``, or at the latest by the next iter()/next()."""
    try:
        loader.load_state_dict(state)
        next(iter(loader))
    finally:
        loader.close()


def a_state(make_loader: Callable[[], Any], batches: int = 2) -> dict:
    loader = make_loader()
    try:
        iterator = iter(loader)
        for _ in range(batches):
            next(iterator)
        return take_state(loader)
    finally:
        loader.close()


@pytest.mark.parametrize("maker", [training, validation])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_from_a_dataset_of_another_length_is_refused(maker, num_workers):
    state = a_state(maker(num_workers, size=60))
    with pytest.raises(InvalidConfigError) as refused:
        load_and_draw(maker(num_workers, size=50)(), state)
    assert "60" in str(refused.value) and "50" in str(refused.value), refused.value


def test_a_device_loader_refuses_a_state_of_another_length():
    state = a_state(training(0, size=60, device="cpu"))
    with pytest.raises(InvalidConfigError) as refused:
        load_and_draw(training(0, size=50, device="cpu")(), state)
    assert "60" in str(refused.value) and "50" in str(refused.value), refused.value


def test_an_adaptive_loader_refuses_a_state_of_another_length():
    state = a_state(training(0, size=60, adapt=True, adapt_every=1000))
    with pytest.raises(InvalidConfigError) as refused:
        load_and_draw(training(0, size=50, adapt=True, adapt_every=1000)(), state)
    assert "60" in str(refused.value) and "50" in str(refused.value), refused.value


def test_a_state_from_another_sampler_is_refused():
    """A shuffled training order's state loaded by an in-order validation loader."""
    state = a_state(training(0, size=40))
    with pytest.raises(InvalidConfigError):
        load_and_draw(validation(0, size=40)(), state)


@pytest.mark.parametrize("state", [
    None, "a state", 42, [1, 2], {}, {"garbage": True}, {"version": {"no": "counts"}},
], ids=["None", "str", "int", "list", "empty", "garbage", "garbage-version"])
def test_garbage_is_refused(state):
    with pytest.raises(InvalidConfigError):
        load_and_draw(training(0)(), state)


def test_an_adaptive_loader_that_changed_its_workers_resumes_at_that_count(training_reference):
    """A change by adapt=True mid-epoch (2 -> 1 worker, decided through its own path), then a
    stop: the state carries the count, the resumed loader runs at it, and the batches are
    the uninterrupted run's."""
    from autotune.policy import adapt

    make = training(2, adapt=True, adapt_every=1000)
    loader = make()
    delivered: list[Any] = []
    try:
        loader._watch = lambda: (adapt.Change(workers=1, reason="forced")
                                 if loader.steps == 3 else None)
        for batch in loader:
            delivered.append(batch)
            if len(delivered) == 6:
                state = take_state(loader)
                break
        assert [(c.from_workers, c.to_workers) for c in loader.changes] == [(2, 1)]
    finally:
        loader.close()
    assert state["workers"] == 1
    resumed = make()
    try:
        resumed.load_state_dict(state)
        rest = [list(resumed) for _ in range(2)]
        assert resumed.num_workers == 1
    finally:
        resumed.close()
    assert_same_batches(delivered + rest[0] + rest[1],
                        training_reference[0] + training_reference[1])
