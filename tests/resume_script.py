"""Resumes in a new process (see test_resume.py): ``python tests/resume_script.py STATE OUT``
builds the test's training loader, loads the state saved in STATE with torch.save, finishes
that epoch and one more, and saves the batches it got to OUT with torch.save."""

import sys
import warnings

import torch

from test_resume import training

if __name__ == "__main__":
    warnings.simplefilter("ignore")
    state_file, out_file = sys.argv[1:3]
    loader = training(2)()
    try:
        loader.load_state_dict(torch.load(state_file, weights_only=True))
        batches = list(loader) + list(loader)  # the rest of the saved epoch, then the next
    finally:
        loader.close()
    torch.save(batches, out_file)
