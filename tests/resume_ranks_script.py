"""Run under `torchrun --nproc_per_node 2`: each rank's seeded training loader (2 workers,
``test_resume.training``: ``Noisy`` samples, batches of 4) stopped mid-epoch and resumed in
new processes.

    resume_ranks_script.py whole  OUT_DIR     # 2 epochs -> OUT_DIR/whole_rank<r>.pt
    resume_ranks_script.py stop   OUT_DIR K   # K batches of epoch 0 -> OUT_DIR/before_rank<r>.pt,
                                              # loader.state_dict() -> OUT_DIR/state_rank<r>.pt
    resume_ranks_script.py resume OUT_DIR     # loads state_rank<r>.pt, the rest of epoch 0
                                              # and epoch 1 -> OUT_DIR/after_rank<r>.pt

Every file is a ``torch.save``d list of batches (or the state), one per rank; the sampler's
class name goes beside the batches (``sampler_rank<r>.txt``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_resume import training

SIZE = 48  # 24 samples a rank (no padding): 6 batches of 4 a rank an epoch


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = training(2, size=SIZE)()
    try:
        (out / f"sampler_rank{rank}.txt").write_text(type(loader.sampler).__name__)
        if mode == "whole":
            torch.save(list(loader) + list(loader), out / f"whole_rank{rank}.pt")
        elif mode == "stop":
            batches, before = iter(loader), []
            for _ in range(int(sys.argv[3])):
                before.append(next(batches))
            torch.save(loader.state_dict(), out / f"state_rank{rank}.pt")
            torch.save(before, out / f"before_rank{rank}.pt")
        elif mode == "resume":
            loader.load_state_dict(torch.load(out / f"state_rank{rank}.pt", weights_only=True))
            torch.save(list(loader) + list(loader), out / f"after_rank{rank}.pt")
        else:
            raise SystemExit(f"unknown mode {mode!r}: whole, stop or resume")
    finally:
        loader.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
