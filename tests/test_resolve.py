"""Precedence in one place: explicit keyword > tuned profile entry > rules, as a table."""

from __future__ import annotations

import pytest

from autotune import DatasetHints, InvalidConfigError, LoaderConfig, WorkloadProfile
from autotune.config import EXPLICIT
from autotune.policy import joint
from autotune.policy.resolve import IN_ORDER_FOR_ADAPT, check_yields_a_batch, resolve
from autotune.policy.rules import recommend

from fakes import fake_hardware

HW = fake_hardware(cpus=8)
WAITING = WorkloadProfile(samples=64, sec_per_sample=5e-3, cpu_sec_per_sample=5e-5,
                          sample_bytes=1024, single_thread_sec_per_sample=5e-3,
                          single_thread_cpu_sec_per_sample=5e-5)
ENTRY = {"num_workers": 6, "prefetch_factor": 4, "persistent_workers": True,
         "in_order": False, "worker_threads": 1}
TRAIN = DatasetHints(dataset_size=50_000, batch_size=64, training=True)
VAL = DatasetHints(dataset_size=50_000, batch_size=64, training=False)
# One loader of two sharing the loop (``create_training_loaders``): 3 of the 8 workers.
SHARE = joint.Share(
    member=joint.Member(name="a", hints=TRAIN, workload=WAITING, share=0.5, alone=8),
    splits={"a": joint.Split(workers=3, reason="3 of 8"), "b": joint.Split(workers=5, reason="")},
    strategy="round_robin")

# (hints, entry, explicit) -> expected source and settings (None: the rules' value)
TABLE = [
    ("rules alone", TRAIN, None, {}, "rules", {}),
    ("entry wins over rules", TRAIN, ENTRY, {}, "profile",
     {"num_workers": 6, "prefetch_factor": 4, "in_order": False, "worker_threads": 1}),
    ("explicit other setting over entry", TRAIN, ENTRY, {"prefetch_factor": 3}, "override",
     {"num_workers": 6, "prefetch_factor": 3, "in_order": False}),
    ("explicit workers set the entry aside", TRAIN, ENTRY, {"num_workers": 2}, "override",
     {"num_workers": 2, "in_order": True}),
    ("explicit workers over rules", TRAIN, None, {"num_workers": 0}, "override",
     {"num_workers": 0, "prefetch_factor": None, "persistent_workers": False}),
    ("validation keeps the rules' persistence and order", VAL, ENTRY, {}, "profile",
     {"num_workers": 6, "prefetch_factor": 4, "persistent_workers": False, "in_order": True}),
    ("explicit drop_last over the rules", TRAIN, None, {"drop_last": False}, "override",
     {"drop_last": False}),
]

# The re-tuner's count (workers=), a group's share (share=) and adapt=True, as inputs.
CASES = [
    ("adapt's count wins over the explicit start", TRAIN, None, {"num_workers": 2},
     {"workers": 5}, "rules", {"num_workers": 5}),
    ("adapt's count keeps the entry's other settings", TRAIN, ENTRY, {}, {"workers": 5},
     "profile", {"num_workers": 5, "prefetch_factor": 4, "worker_threads": 1}),
    ("adapt's count of 0 sets the entry aside", TRAIN, ENTRY, {}, {"workers": 0}, "rules",
     {"num_workers": 0}),
    ("adapt=True keeps batches in order", TRAIN, ENTRY, {}, {"adaptive": True}, "profile",
     {"num_workers": 6, "prefetch_factor": 4, "in_order": True}),
    ("a share sizes a loader without entry or explicit count", TRAIN, None, {},
     {"share": SHARE}, "rules", {"num_workers": 3}),
    ("an explicit count sets the share aside", TRAIN, None, {"num_workers": 2},
     {"share": SHARE}, "override", {"num_workers": 2}),
    ("an entry wins over the share", TRAIN, ENTRY, {}, {"share": SHARE}, "profile",
     {"num_workers": 6, "prefetch_factor": 4}),
]


@pytest.mark.parametrize("name, hints, entry, explicit, inputs, source, expected",
                         [(*row[:4], {}, *row[4:]) for row in TABLE] + CASES,
                         ids=[row[0] for row in TABLE + CASES])
def test_precedence_table(name, hints, entry, explicit, inputs, source, expected):
    config = resolve(HW, hints, WAITING, entry=entry, entry_reason="tuned here",
                     explicit=explicit, **inputs)
    rules = recommend(HW, hints, WAITING)
    assert config.source == source
    for setting, value in config.settings().items():
        want = expected.get(setting, getattr(rules, setting))
        if setting not in expected and "num_workers" in expected:
            continue  # the rules re-size the rest for the chosen count
        assert value == want, setting
    overruled = {"num_workers"} if "workers" in inputs else set()  # by the re-tuner's count
    for setting in set(explicit) - overruled:
        assert config.reasons[setting] == EXPLICIT
    if source == "profile":
        chosen = "num_workers" if "workers" not in inputs else "prefetch_factor"
        assert config.reasons[chosen] == "tuned here"
    if inputs.get("adaptive"):
        assert config.reasons["in_order"] == IN_ORDER_FOR_ADAPT
    if "share" in inputs and not explicit and entry is None:
        assert config.reasons["num_workers"] == "3 of 8"


@pytest.mark.parametrize("explicit, match", [
    ({"num_workers": -1}, "num_workers=-1 must be an integer >= 0"),
    ({"num_workers": 2.5}, "num_workers=2.5 must be an integer"),
    ({"prefetch_factor": 0}, "prefetch_factor=0"),
    ({"timeout": float("nan")}, "timeout=nan"),
    ({"pin_memory": "yes"}, "pin_memory='yes'"),
    ({"num_wrokers": 2}, "unknown setting"),
])
def test_explicit_values_are_checked_before_any_rule(explicit, match):
    with pytest.raises(InvalidConfigError, match=match):
        resolve(HW, TRAIN, WAITING, explicit=explicit)


def test_a_loader_that_would_yield_no_batch_is_refused():
    with pytest.raises(InvalidConfigError, match=r"batch_size=64 .*drop_last=True.* 10 "):
        check_yields_a_batch(LoaderConfig(drop_last=True), 10, 64)
    check_yields_a_batch(LoaderConfig(drop_last=False), 10, 64)  # one partial batch
    check_yields_a_batch(LoaderConfig(drop_last=True), 64, 64)  # one full batch
