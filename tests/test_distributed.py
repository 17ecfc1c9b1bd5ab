"""The factory's loaders under a real `torchrun --nproc_per_node 2` (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_resume import assert_same_batches

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp") / "seen.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_factory_script.py"), str(out)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_training_ranks_get_disjoint_covering_shares_reshuffled_every_epoch(ranks):
    assert [r["sampler"] for r in ranks] == ["EpochDistributedSampler"] * 2
    for epoch in range(3):
        zero, one = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert len(zero) == len(one) == 320
        assert not set(zero) & set(one)
        assert sorted(zero + one) == list(range(640))
    for rank in ranks:  # set_epoch was never called, yet every epoch has its own order
        orders = [tuple(epoch) for epoch in rank["epochs"]]
        assert len(set(orders)) == 3
        assert len({frozenset(o) for o in orders}) == 3  # and its own share of samples


def test_epochs_run_on_across_boundaries_and_set_epoch_by_hand_is_obeyed(ranks):
    """The training loaders draw the next epoch ahead; a set_epoch that matches the draw
    keeps it, one that does not gets its own epoch's order, never the stale one."""
    for rank in ranks:
        assert rank["across"] is True
        for name in ("set_epoch", "set_epoch_jump"):
            got, want = rank[name]["got"], rank[name]["want"]
            assert got == want, name
    for name in ("set_epoch", "set_epoch_jump"):  # each epoch: the ranks' shares cover it
        for epoch in range(3):
            both = ranks[0][name]["got"][epoch] + ranks[1][name]["got"][epoch]
            assert sorted(both) == list(range(640))


def test_evaluation_counts_every_sample_once_across_ranks(ranks):
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(63))
    assert ranks[0]["val"] == sorted(ranks[0]["val"])  # in order


def test_a_stream_through_shard_iterable_is_split_by_rank_and_worker(ranks):
    assert sorted(ranks[0]["stream"] + ranks[1]["stream"]) == list(range(101))


def test_a_stream_that_is_the_same_on_every_rank_is_refused_with_the_fix(ranks):
    for rank in ranks:
        message = rank["same_on_every_rank"]
        assert "Stream yields the same items on all 2 ranks" in message
        assert "torch.distributed.get_rank()" in message and "shard_iterable" in message


def test_a_stream_that_splits_by_rank_itself_passes_quietly(ranks):
    assert sorted(ranks[0]["rank_stream"] + ranks[1]["rank_stream"]) == list(range(40))
    assert not any("IterableDataset" in w for w in ranks[1]["warnings"])


def test_a_stream_built_on_one_rank_only_gets_a_warning_not_a_hang(ranks):
    assert any("could not compare across ranks" in w and "shard_iterable" in w
               for w in ranks[0]["warnings"])


def test_adapt_keeps_each_ranks_share_through_a_change_mid_epoch(ranks):
    for epoch in range(2):
        zero, one = (r["adapt"]["epochs"][epoch] for r in ranks)
        assert len(zero) == len(one) == 48 and sorted(zero + one) == list(range(96))
    for rank in ranks:
        per_epoch = rank["adapt"]["per_epoch"]
        assert any(step % per_epoch for step in rank["adapt"]["changes"])  # one mid-epoch
        assert rank["adapt"]["epochs"][0] != rank["adapt"]["epochs"][1]  # reshuffled


def test_loaders_sized_together_split_each_dataset_by_rank(ranks):
    for name, size in (("a", 40), ("b", 24)):
        zero, one = ranks[0]["multi"][name], ranks[1]["multi"][name]
        assert not set(zero) & set(one) and sorted(zero + one) == list(range(size))


# -- mid-epoch resume, each rank from its own state ----------------------------------------------


def torchrun(script: str, *arguments: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / script), *arguments],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_each_rank_resumes_mid_epoch_from_its_own_state_in_new_processes(tmp_path):
    """``resume_ranks_script.py``: run A trains 2 epochs uninterrupted; run B stops each rank
    after 4 of its 6 batches of epoch 0 and saves ``loader.state_dict()``; run C (new
    processes) loads each rank's state and finishes. Per rank, B + C is A bit for bit (random
    augmentations included), and the ranks' shares are disjoint and cover each epoch."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    torchrun("resume_ranks_script.py", "whole", str(whole))
    torchrun("resume_ranks_script.py", "stop", str(parts), "4")
    torchrun("resume_ranks_script.py", "resume", str(parts))
    wanted = []
    for rank in (0, 1):
        want = torch.load(whole / f"whole_rank{rank}.pt", weights_only=True)
        before = torch.load(parts / f"before_rank{rank}.pt", weights_only=True)
        after = torch.load(parts / f"after_rank{rank}.pt", weights_only=True)
        assert (whole / f"sampler_rank{rank}.txt").read_text() == "EpochDistributedSampler"
        assert len(want) == 12 and len(before) == 4 and len(after) == 8, \
            (len(want), len(before), len(after))
        assert_same_batches(before + after, want,
                            [f"rank {rank}: epoch {i // 6} batch {i % 6}" for i in range(12)])
        wanted.append(want)
    for epoch in range(2):
        zero, one = (torch.cat(w[6 * epoch:6 * epoch + 6])[:, 0].tolist() for w in wanted)
        assert len(zero) == len(one) == 24
        assert not set(zero) & set(one), f"epoch {epoch}: both ranks drew {set(zero) & set(one)}"
        assert sorted(zero + one) == [float(i) for i in range(48)]
    for w in wanted:  # each rank: a new order every epoch, and fresh draws
        assert torch.cat(w[:6])[:, 0].tolist() != torch.cat(w[6:])[:, 0].tolist()
    first = {row[0].item(): row[1:] for row in torch.cat(wanted[0][:6] + wanted[1][:6])}
    second = {row[0].item(): row[1:] for row in torch.cat(wanted[0][6:] + wanted[1][6:])}
    assert all(not torch.equal(first[i], second[i]) for i in first)
