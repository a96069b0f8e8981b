"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter when there is no GPU.

TRITON_INTERPRET has to be set before `pangu_pi.kernels.siaf_triton` is first imported (its
@triton.jit decorators read it), so it is set here, at collection, and only where CUDA is absent:
with a GPU the same tests run the real kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
