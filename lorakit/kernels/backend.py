"""Choosing between a Triton kernel and its pure-PyTorch reference.

``backend="auto"`` picks Triton for CUDA tensors when the ``triton`` package imports, and the reference
otherwise. ``backend="triton"`` forces the kernel: on a CPU tensor that only works under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the kernel modules are imported), which the CPU tests use.
``backend="torch"`` forces the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is never imported here)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    """Whether to run the Triton kernel for ``tensor`` under ``backend`` ("auto", "triton" or "torch")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the triton package: pip install triton")
        if not tensor.is_cuda and not triton_interpreting():
            raise ValueError(
                f"backend='triton' on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 (Triton's CPU "
                "interpreter); use backend='auto' or 'torch' instead"
            )
        return True
    return tensor.is_cuda and triton_available()
