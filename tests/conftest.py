"""Test-wide set-up: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here, before kvbm is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
