"""The threaded CPU backend of 4-bit dequantization (`lorakit.quant.nf4.dequantize_4bit` on CPU).

Computes the formula of ``lorakit.quant.nf4._dequantize_4bit_reference`` bit for bit (same fp32 products, one
rounding), in steps of whole blocks, on the calling thread or on a pool of worker threads; see
:func:`dequantize_4bit_cpu` for why. Measured in ``bench/bench_quant.py``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import torch

_STEP = 32768  # elements per step on a thread with several intra-op threads: at::internal::GRAIN_SIZE
_WORKER_STEP = 2**18  # elements per dequantization step on a thread with one intra-op thread (bench_quant.py)
_PARALLEL_MIN = 2**21  # elements from which dequantization goes to worker threads
_HUGE_PAGE = 2**21  # bytes (x86-64 / aarch64 transparent huge page)
_Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one dequantization step: bytes, absmax, output (_steps)


def dequantize_4bit_cpu(
    data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """The 4-bit dequantization formula on CPU, in steps and threads; returns ``(n,)`` in ``dtype``::

        out[i] = dtype(code[q_i] * absmax[i // blocksize])      (fp32 product, one rounding)
        q_2k = byte[k] >> 4,   q_2k+1 = byte[k] & 15

    How: a 256-entry table maps a byte to its two fp32 code values, stored as one float64 so that one int32
    ``index_select`` gathers both; the gathered values, viewed as (blocks, blocksize), are multiplied by a
    broadcast ``absmax[:, None]`` and copied into the preallocated output (the one rounding). Same fp32
    products, same rounding: bit-identical to the formula, however the blocks are split into steps.

    On CPU no op may open an OpenMP region: on a busy machine each region waits for a descheduled thread
    (steps of 65536 elements with 2 intra-op threads took seconds instead of ~0.2 s). Three ways, by thread:

    - a thread with one intra-op thread runs ops inline: steps of ``_WORKER_STEP`` (few ops, little overhead);
    - a large tensor on a thread with more: :func:`_in_workers` hands steps of ``_WORKER_STEP`` to one worker
      thread per usable core, each with one intra-op thread; a descheduled worker leaves its steps to the
      others, so with one free core this costs about what one thread does;
    - a small tensor on such a thread: steps of ``_STEP`` (torch's grain size), inline by construction.

    Page faults on a fresh output cost more than the arithmetic, so a large output is advised to use huge pages.
    """
    pairs = _byte_pairs(code.float())  # (256,) float64 = (code[b >> 4], code[b & 15]) as fp32
    out = torch.empty(n, dtype=dtype, device=data.device)  # (n,)
    nblocks = n // blocksize  # full blocks; a partial last block follows them
    absmax = absmax.float()
    threads = torch.get_num_threads()
    workers = _cpu_workers(threads) if threads > 1 and n >= _PARALLEL_MIN else 0
    per_step = max(1, (_STEP if threads > 1 and not workers else _WORKER_STEP) // blocksize)  # blocks per step
    _advise_huge_pages(out)
    steps = _steps(data, absmax, out, blocksize, nblocks, per_step)
    if workers:
        _in_workers(steps, pairs, per_step * blocksize // 2, workers)
    else:
        _dequantize_steps(steps, pairs, per_step * blocksize // 2)
    if nblocks * blocksize < n:
        start = nblocks * blocksize
        tail = pairs.index_select(0, data[start // 2 :].int()).view(torch.float32)[: n - start]
        out[start:] = tail * absmax[nblocks]
    return out


def _dequantize_steps(steps: Callable[[], _Step | None] | Iterator[_Step], pairs: torch.Tensor, size: int) -> None:
    """``dst = dtype(pairs[codes] * scale)`` for each step ``(codes (k / 2,), scale (b, 1), dst (b, blocksize))``
    from an iterator or a function returning None at the end; ``size`` is the largest ``k / 2``."""
    index = torch.empty(size, dtype=torch.int32, device=pairs.device)  # scratch reused across steps
    values = torch.empty(size, dtype=torch.float64, device=pairs.device)  # fp32 pairs
    for codes, scale, dst in iter(steps, None) if callable(steps) else steps:
        if codes.numel() != index.numel():  # a shorter step
            index, values = index[: codes.numel()], values[: codes.numel()]
        index.copy_(codes)
        torch.index_select(pairs, 0, index, out=values)
        val32 = values.view(torch.float32).view(dst.shape)  # (b, blocksize)
        if dst.dtype == torch.float32:
            torch.mul(val32, scale, out=dst)
        else:
            dst.copy_(val32.mul_(scale))  # fp32 product, then one rounding to dtype


@functools.cache
def _openmp() -> bool:
    """Whether torch's intra-op threads are OpenMP's, whose thread count is set per calling thread."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _cpu_workers(threads: int) -> int:
    """Worker threads for a large CPU dequantization: the calling thread's intra-op threads, at most one per
    core this process may run on (``sched_getaffinity``; ``cpu_count`` where that is missing). 0 (none) unless
    the backend is OpenMP: other backends share one thread count, which a worker must not lower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(threads, cores)) if _openmp() else 0


_POOL_LOCK = threading.Lock()
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (max_workers, pool), made on first use


def _forget_pool() -> None:
    """In a forked child: the parent's worker threads do not exist there, and another thread of the parent may
    have held the lock at the fork; the child starts with no pool and a free lock."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_forget_pool)


def _in_workers(steps: Iterator[_Step], pairs: torch.Tensor, size: int, workers: int) -> None:
    """:func:`_dequantize_steps` on ``workers`` threads of a persistent pool, each running torch ops inline.

    The steps are handed out one at a time from the shared iterator (a descheduled worker's share goes to the
    others). Each worker sets itself to one intra-op thread once; OpenMP keeps that setting per thread, but
    ``torch.set_num_threads`` also sets process-wide defaults (for threads not yet started, MKL's pool), so the
    caller's value is set again afterwards, also when a worker raised. Workers run under inference mode: they
    write into views of the caller's output, which may be an inference tensor. A pool too small for
    ``workers`` is replaced; the old one is shut down without waiting (its running calls finish).
    """
    global _POOL
    threads = torch.get_num_threads()
    lock = threading.Lock()

    def next_step() -> _Step | None:
        with lock:
            return next(steps, None)

    def worker() -> None:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with torch.inference_mode():
            _dequantize_steps(next_step, pairs, size)

    try:
        with _POOL_LOCK:  # submitted under the lock: another caller may not shut this pool down before
            if _POOL is None or _POOL[0] < workers:
                if _POOL is not None:
                    _POOL[1].shutdown(wait=False)
                _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="lorakit-dequant"))
            futures = [_POOL[1].submit(worker) for _ in range(workers)]
        wait(futures)
        for f in futures:
            f.result()  # raises a worker's exception
    finally:
        torch.set_num_threads(threads)


def _byte_pairs(code: torch.Tensor) -> torch.Tensor:
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).view(torch.float64).reshape(256)


def _steps(
    data: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, blocksize: int, nblocks: int, per_step: int
) -> Iterator[_Step]:
    """``(bytes (k / 2,), absmax (b, 1), out (b, blocksize))`` per step of ``b = per_step`` full blocks (the
    last step may be shorter); views made by ``unbind`` (one call each, cheaper than slicing per step)."""
    even = nblocks - nblocks % per_step
    parts = [(0, even, per_step)] if even else []
    if even < nblocks:
        parts.append((even, nblocks, nblocks - even))
    for start, end, b in parts:
        count = (end - start) // b
        yield from zip(
            data[start * blocksize // 2 : end * blocksize // 2].view(count, -1).unbind(0),
            absmax[start:end].view(count, b, 1).unbind(0),
            out[start * blocksize : end * blocksize].view(count, b, blocksize).unbind(0),
            strict=True,
        )


def _advise_huge_pages(t: torch.Tensor) -> None:
    """``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned interior of a large fresh CPU tensor (Linux; else a no-op).

    The first write to a fresh 4 KiB page faults; for a 4096 x 14336 bf16 output (117 MB) the faults alone took
    ~60-90 ms of a single thread on the development machine, ~12 ms with huge pages. Advice only: the bytes
    are unchanged; it is skipped when the kernel or libc does not offer it.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < 2 * _HUGE_PAGE or type(t) is not torch.Tensor or sys.platform != "linux":
        return
    madvise = _madvise()
    if madvise is None:
        return
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        madvise(start, end - start, 14)  # MADV_HUGEPAGE; the result is ignored (advice)


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
