"""The adapters' rank-r products on CPU through oneDNN, where it is faster than torch's default fp32 GEMM.

A LoRA linear with rank r adds six products per training step in which one dimension is r (M tokens):

    x A^T   (M, in) @ (in, r)        h B^T   (M, r) @ (r, out)       dY B    (M, out) @ (out, r)
    dA      (r, M) @ (M, in)         dB^T    (r, M) @ (M, out)       g A     (M, r) @ (r, in)

torch computes fp32 ``mm`` on CPU with MKL's sgemm. On the development machine (AMD EPYC, AVX-512; MKL takes
its AVX2 path on AMD processors) oneDNN's JIT matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch's
own CPU compiler emits for linear layers) ran these shapes in 0.44-0.58x MKL's time at M = 1024 (r = 16, in / out
512 and 1376, one thread), and slower below ~4 MFLOP, where its ~10 us per call dominates (M = 64: 1.15-1.45x).

Which library wins depends on the processor and the shape: on a second machine (AMD EPYC, Zen 3, AVX2 only)
oneDNN took 0.70-0.81x MKL's time for x A^T but 1.2-2.2x for some of the others (e.g. h B^T at out = 1376).
So the choice is measured, once per shape, on the machine it runs on.

oneDNN builds (JIT-compiles) a kernel for every new shape and stride: ~0.5 ms on the first call of a shape. So a
product is considered only when it is large enough and its (shapes, strides) key has been seen
``ONEDNN_AFTER_CALLS`` times: training on fixed shapes (packed or padded batches) pays the build once per shape,
and a run whose batch shapes never repeat stays on MKL instead of building a kernel per batch. On that call both
libraries compute the product ``TRIAL_REPS`` times, taking turns, and the key keeps oneDNN only if its fastest
time is below ``ONEDNN_MARGIN`` x MKL's fastest; the decision is kept for the life of the process. At most
``MAX_TRACKED`` keys are counted; shapes past that stay on MKL. With ``torch.use_deterministic_algorithms(True)``
every product stays on MKL: a timed choice could differ between two runs, and with it the last bits.

``rank_matmul_reference`` is the plain formula; results agree with it to fp32 rounding (the summation order
differs: ~1e-6 relative). Base-layer GEMMs are left to torch, so a frozen base computes as it does without
adapters.
"""

from __future__ import annotations

import time

import torch

#: Use oneDNN for fp32 CPU products of at least this many FLOPs (2 m k n): below it the per-call overhead
#: (~10 us) outweighs the faster kernel (measured break-even between M = 64 and M = 256 at in = 512, r = 16).
ONEDNN_MIN_FLOPS = 1 << 22
#: ... once the same (shapes, strides) key has been seen this many times (a new key costs a ~0.5 ms kernel build,
#: which ~5 calls of a 1024-row product repay).
ONEDNN_AFTER_CALLS = 8
#: Timed calls of each library when a key is decided (the fastest of each is compared).
TRIAL_REPS = 3
#: oneDNN is kept for a key only if its fastest trial time is below this fraction of MKL's fastest.
ONEDNN_MARGIN = 0.95
#: Keys counted at most; a product whose key is not counted stays on MKL.
MAX_TRACKED = 4096
#: Switch for the oneDNN path (False: always ``torch.mm`` / ``torch.addmm``).
enabled = True

_seen: dict[tuple, int] = {}  # key -> calls seen so far, or _REFERENCE / _ONEDNN once decided
_REFERENCE = -1
_ONEDNN = -2
_linear_pointwise = None  # resolved on first use: torch.ops.mkldnn._linear_pointwise, or False if unavailable


def _onednn_linear():
    global _linear_pointwise
    if _linear_pointwise is None:
        op = False
        if torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
            except (AttributeError, RuntimeError):
                op = False
        _linear_pointwise = op
    return _linear_pointwise


def rank_matmul_reference(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)``: (m, k) @ (k, n) -> (m, n), a new tensor."""
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def rank_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)`` for 2-D ``a`` (m, k) and ``b`` (k, n), any strides; a new contiguous (m, n) tensor.

    Computed by oneDNN for large enough fp32 CPU products whose key has repeated and on which oneDNN measured
    faster (module docstring), else by ``rank_matmul_reference``. Not differentiable: for use inside autograd
    Functions.
    """
    m, k = a.shape
    n = b.shape[1]
    if (
        not enabled
        or a.dtype != torch.float32
        or a.device.type != "cpu"
        or b.dtype != torch.float32
        or (bias is not None and bias.dtype != torch.float32)
        or 2 * m * k * n < ONEDNN_MIN_FLOPS
        or torch.compiler.is_compiling()  # traced code keeps the plain op (and no counting in the graph)
    ):
        return rank_matmul_reference(a, b, bias)
    key = (m, k, n, a.stride(), b.stride(), bias is not None)
    count = _seen.get(key)
    if count == _ONEDNN:
        try:
            return _onednn_linear()(a, b.t(), bias, "none", [], "")  # a @ (b^T)^T + bias: weight given as (n, k)
        except RuntimeError:  # a layout it does not take after all: this key stays on the reference
            _seen[key] = _REFERENCE
            return rank_matmul_reference(a, b, bias)
    if count is None:
        if len(_seen) >= MAX_TRACKED:
            return rank_matmul_reference(a, b, bias)
        count = 0
    if count < ONEDNN_AFTER_CALLS:  # counting (count >= 0), or decided for the reference (_REFERENCE)
        if count >= 0:
            _seen[key] = count + 1
        return rank_matmul_reference(a, b, bias)
    op = _onednn_linear()
    if not op or torch.are_deterministic_algorithms_enabled():
        _seen[key] = _REFERENCE
        return rank_matmul_reference(a, b, bias)
    try:
        faster = _onednn_is_faster(op, a, b, bias)
    except RuntimeError:  # a layout oneDNN does not take
        faster = False
    _seen[key] = _ONEDNN if faster else _REFERENCE
    return rank_matmul_reference(a, b, bias)


def _onednn_is_faster(op, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN's ``op`` computes ``a @ b (+ bias)`` in under ``ONEDNN_MARGIN`` x the reference's time:
    one untimed call builds its kernel, then ``TRIAL_REPS`` timed calls of each, taking turns (fastest of each)."""
    wt = b.t()
    op(a, wt, bias, "none", [], "")
    best_ref = best_dnn = float("inf")
    for _ in range(TRIAL_REPS):
        t0 = time.perf_counter()
        rank_matmul_reference(a, b, bias)
        t1 = time.perf_counter()
        op(a, wt, bias, "none", [], "")
        t2 = time.perf_counter()
        best_ref, best_dnn = min(best_ref, t1 - t0), min(best_dnn, t2 - t1)
    return best_dnn < ONEDNN_MARGIN * best_ref
