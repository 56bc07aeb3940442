"""Opt-in activation offloading: tensors saved for the backward go to pinned host memory on a side stream.

With activation checkpointing, what the backward keeps per layer is the layer's input hidden state
(B, T, H); at long sequence lengths that dominates device memory (layers x B x T x H x 2 bytes in bf16).
``offload_activations`` installs ``torch.autograd.graph.saved_tensors_hooks`` that copy every saved CUDA
tensor of at least ``min_bytes`` to pinned host memory on a side stream (so the device-to-host copy overlaps
the next layer's compute) and copy it back when the backward unpacks it. Model weights (``model=``) are never
moved. On CPU tensors the hooks pass through unchanged.

Activation checkpointing (either ``use_reentrant`` mode, as transformers' ``activation_checkpointing_enable``
sets it up) saves each checkpointed layer's inputs through ``save_for_backward``, so these hooks see, and
offload, exactly the checkpointed activations; the tensors saved inside a checkpointed layer are not kept at all.

Usage (training step)::

    with offload_activations(model=model) as stats:
        loss = compute_loss(model, batch)
    loss.backward()

The transfer back runs on the compute stream when the backward reaches the tensor (non-blocking from
pinned memory); prefetching it ahead of the backward is not done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class OffloadStats:
    """What one ``offload_activations`` block moved to host memory."""

    tensors: int = 0
    """Saved tensors copied to host memory."""
    bytes: int = 0
    """Their total size in bytes."""
    seen: int = 0
    """Saved tensors the hooks saw (offloaded or not; on CPU every one passes through)."""
    _keep: set[int] = field(default_factory=set, repr=False)


def _storage_ptrs(model: nn.Module | None) -> set[int]:
    if model is None:
        return set()
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors}


@contextmanager
def offload_activations(
    model: nn.Module | None = None,
    min_bytes: int = 1 << 20,
    pin_memory: bool = True,
    enabled: bool = True,
) -> Iterator[OffloadStats]:
    """Offload tensors saved for the backward inside this block to (pinned) host memory.

    Args:
        model: tensors sharing storage with its parameters or buffers stay where they are.
        min_bytes: smaller saved tensors stay on the device (masks, (M, r) adapter activations, scalars);
            the default 1 MiB keeps the copies to the large activations.
        pin_memory: copy into pinned host memory (needed for asynchronous copies).
        enabled: False makes the block a no-op (a training config switch).

    Yields:
        ``OffloadStats``, filled in as the forward runs.
    """
    if min_bytes < 0:
        raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
    stats = OffloadStats(_keep=_storage_ptrs(model))
    if not enabled:
        yield stats
        return
    side_stream: torch.cuda.Stream | None = None

    def pack(t: torch.Tensor) -> Any:
        nonlocal side_stream
        stats.seen += 1
        size = t.numel() * t.element_size()
        if not t.is_cuda or size < min_bytes or t.untyped_storage().data_ptr() in stats._keep:
            return t
        if side_stream is None:
            side_stream = torch.cuda.Stream(device=t.device)
        host = torch.empty_like(t, device="cpu", pin_memory=pin_memory)
        side_stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
        with torch.cuda.stream(side_stream):
            host.copy_(t, non_blocking=pin_memory)
            done = torch.cuda.Event()
            done.record(side_stream)
        t.record_stream(side_stream)  # t's memory is not reused before the copy has read it
        stats.tensors += 1
        stats.bytes += size
        return t.device, host, done

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=pin_memory)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
