"""Run under `torchrun --nproc_per_node 2`: what each rank's factory loaders yield.

Rank 0 writes every rank's items (gathered over gloo) to the JSON file named by argv[1].
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import autotune
from datasets import Indexed, RankStream, SleepyIndexed, Stream, UnshardedStream


def items(loader) -> list[int]:
    return torch.cat([batch.view(-1) for batch in loader]).tolist()


def main() -> None:
    dist.init_process_group("gloo")
    factory = autotune.OptimalDataLoaderFactory(seed=5)
    seen: dict[str, object] = {}
    with factory.create_training_loader(Indexed(640), batch_size=16, num_workers=1) as train:
        seen["sampler"] = type(train.sampler).__name__
        seen["epochs"] = [items(train) for _ in range(3)]  # no set_epoch call: the factory's
        seen["across"] = train.autotune_config.prefetch_across_epochs
    # set_epoch by hand, as a DDP loop does: matching what was drawn ahead (0, 1, 2, ...) and
    # not (0, 5, 6: the draw ahead of epoch 1 is stale), and what each epoch must be
    for name, chosen in (("set_epoch", (0, 1, 2)), ("set_epoch_jump", (0, 5, 6))):
        with factory.create_training_loader(Indexed(640), batch_size=16,
                                            num_workers=2) as train:
            got = []
            for epoch in chosen:
                train.sampler.set_epoch(epoch)
                got.append(items(train))
            reference = torch.utils.data.DistributedSampler(range(640), seed=train.sampler.seed)
            want = []
            for epoch in chosen:
                reference.set_epoch(epoch)
                want.append(list(reference))
            seen[name] = {"got": got, "want": want}
    val = factory.create_validation_loader(Indexed(63), batch_size=8, num_workers=0)
    seen["val"] = items(val)
    stream = autotune.shard_iterable(UnshardedStream(101))
    with factory.create_training_loader(stream, batch_size=4, num_workers=2,
                                        drop_last=False) as loader:
        seen["stream"] = items(loader)
    try:
        factory.create_training_loader(Stream(32), batch_size=4, num_workers=0)
    except autotune.WorkerSafetyError as exc:
        seen["same_on_every_rank"] = str(exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with factory.create_training_loader(RankStream(40), batch_size=4, num_workers=2,
                                            drop_last=False) as loader:
            seen["rank_stream"] = items(loader)
        autotune.loading.safety.RANK_CHECK_WAIT_S = 1.0
        if dist.get_rank() == 0:  # the other rank builds no loader: nothing to compare
            factory.create_validation_loader(Stream(32), batch_size=4, num_workers=0)
    seen["warnings"] = [str(w.message) for w in caught]
    # adapt=True: each rank re-tunes its own loader; a change mid-epoch keeps the rank's share
    with factory.create_training_loader(SleepyIndexed(96, 0.004), batch_size=4, num_workers=0,
                                        adapt=True, adapt_every=3) as adaptive:
        epochs = []
        for _ in range(2):
            epoch = []
            for batch in adaptive:
                epoch += batch.view(-1).tolist()
                time.sleep(0.005)
            epochs.append(epoch)
        seen["adapt"] = {"epochs": epochs, "changes": [c.step for c in adaptive.changes],
                         "per_epoch": len(adaptive)}
    # several loaders sized together: each loader's share split by rank
    multi = factory.create_training_loaders({"a": Indexed(40), "b": Indexed(24)}, batch_size=4,
                                            strategy="round_robin", stop="max", num_workers=0)
    by_name: dict[str, list[int]] = {"a": [], "b": []}
    for name, batch in multi:
        by_name[name] += batch.view(-1).tolist()
    seen["multi"] = by_name
    multi.close()
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(everyone))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
