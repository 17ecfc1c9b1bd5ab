from __future__ import annotations

import itertools

import pytest
from torch.utils.data import DataLoader

from autotune import InvalidConfigError, LoaderConfig
from autotune._worker_init import WorkerInit

from datasets import Indexed


@pytest.mark.parametrize("field, value", [
    ("num_workers", -1), ("num_workers", 2.0), ("num_workers", "4"), ("num_workers", True),
    ("prefetch_factor", 0), ("worker_threads", 0), ("pin_memory", "yes"),
    ("persistent_workers", 1), ("multiprocessing_context", "thread"), ("timeout", -1),
    ("source", "guess"),
])
def test_invalid_values_name_field_and_value(field, value):
    with pytest.raises(InvalidConfigError) as err:
        LoaderConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_kwargs_never_a_combination_dataloader_rejects():
    combos = itertools.product([0, 1, 2], [None, 1, 4], [False, True], [None, "fork", "spawn"],
                               [None, 1])
    for workers, prefetch, persistent, context, threads in combos:
        config = LoaderConfig(num_workers=workers, prefetch_factor=prefetch,
                              persistent_workers=persistent, multiprocessing_context=context,
                              worker_threads=threads)
        kwargs = config.dataloader_kwargs()
        DataLoader(Indexed(4), batch_size=2, **kwargs)  # raises if torch rejects it
        if workers == 0:
            assert not {"prefetch_factor", "persistent_workers", "multiprocessing_context",
                        "worker_init_fn"} & set(kwargs)


def test_mapping_of_dataloader_keywords():
    config = LoaderConfig(num_workers=2, prefetch_factor=3, worker_threads=1, drop_last=True)
    assert config["num_workers"] == 2 and config["prefetch_factor"] == 3
    assert set(config) == set(config.dataloader_kwargs())
    assert isinstance(config["worker_init_fn"], WorkerInit)
    loader = DataLoader(Indexed(8), batch_size=4, **config)
    assert loader.num_workers == 2 and loader.prefetch_factor == 3 and loader.drop_last
    assert "prefetch_factor" not in LoaderConfig(num_workers=0, prefetch_factor=3)


def test_user_worker_init_fn_is_chained():
    kwargs = LoaderConfig(num_workers=1).dataloader_kwargs(worker_init_fn=print)
    assert kwargs["worker_init_fn"].user_fn is print
    assert LoaderConfig().dataloader_kwargs(worker_init_fn=print)["worker_init_fn"] is print


def test_roundtrip_and_explain():
    config = LoaderConfig(num_workers=3, prefetch_factor=2, reasons={"num_workers": "why"})
    assert LoaderConfig.from_dict(config.to_dict()) == config
    text = config.explain()
    for name in config.settings():
        assert name in text
    assert "why" in text
    hash(config)


def test_replace_records_reason_and_rejects_unknown():
    config = LoaderConfig().replace(num_workers=4, source="override", reason="set explicitly")
    assert config.num_workers == 4 and config.source == "override"
    assert config.reasons["num_workers"] == "set explicitly"
    with pytest.raises(InvalidConfigError, match="batch_sise"):
        LoaderConfig().replace(batch_sise=3)


def test_timeout_only_with_workers():
    assert "timeout" not in LoaderConfig(timeout=5).dataloader_kwargs()
    loader = DataLoader(Indexed(4), batch_size=2, **LoaderConfig(timeout=5))
    assert len(list(loader)) == 2  # torch refuses a timeout without workers at iter()
    assert LoaderConfig(num_workers=1, timeout=5)["timeout"] == 5


def test_a_config_pickles_with_its_reasons_and_source():
    import pickle

    config = LoaderConfig(num_workers=3, reasons={"num_workers": "because"}, source="tuned")
    back = pickle.loads(pickle.dumps(config))
    assert back == config and back.reasons == {"num_workers": "because"}
    assert back.source == "tuned"
