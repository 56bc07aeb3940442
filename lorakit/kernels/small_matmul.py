"""The adapters' rank-r products on CPU through oneDNN, where it is faster than torch's default fp32 GEMM.

A LoRA linear with rank r adds six products per training step in which one dimension is r (M tokens):

    x A^T   (M, in) @ (in, r)        h B^T   (M, r) @ (r, out)       dY B    (M, out) @ (out, r)
    dA      (r, M) @ (M, in)         dB^T    (r, M) @ (M, out)       g A     (M, r) @ (r, in)

torch computes fp32 ``mm`` on CPU with MKL's sgemm. On the development machine (AMD EPYC, AVX-512; MKL takes
its AVX2 path on AMD processors) oneDNN's JIT matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch's
own CPU compiler emits for linear layers) ran these shapes in 0.44-0.58x MKL's time at M = 1024 (r = 16, in / out
512 and 1376, one thread), and slower below ~4 MFLOP, where its ~10 us per call dominates (M = 64: 1.15-1.45x).

oneDNN builds (JIT-compiles) a kernel for every new shape and stride: ~0.5 ms on the first call of a shape. So a
product goes to oneDNN only when it is large enough and its (shapes, strides) key has been seen
``ONEDNN_AFTER_CALLS`` times: training on fixed shapes (packed or padded batches) pays the build once per shape,
and a run whose batch shapes never repeat stays on MKL instead of building a kernel per batch. At most
``MAX_TRACKED`` keys are counted; shapes past that stay on MKL.

``rank_matmul_reference`` is the plain formula; results agree with it to fp32 rounding (the summation order
differs: ~1e-6 relative). Base-layer GEMMs are left to torch, so a frozen base computes as it does without
adapters.
"""

from __future__ import annotations

import torch

#: Use oneDNN for fp32 CPU products of at least this many FLOPs (2 m k n): below it the per-call overhead
#: (~10 us) outweighs the faster kernel (measured break-even between M = 64 and M = 256 at in = 512, r = 16).
ONEDNN_MIN_FLOPS = 1 << 22
#: ... once the same (shapes, strides) key has been seen this many times (a new key costs a ~0.5 ms kernel build,
#: which ~5 calls of a 1024-row product repay).
ONEDNN_AFTER_CALLS = 8
#: Keys counted at most; a product whose key is not counted stays on MKL.
MAX_TRACKED = 4096
#: Switch for the oneDNN path (False: always ``torch.mm`` / ``torch.addmm``).
enabled = True

_seen: dict[tuple, int] = {}
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

    Computed by oneDNN for large enough fp32 CPU products whose key has repeated (module docstring), else by
    ``rank_matmul_reference``. Not differentiable: for use inside autograd Functions.
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
    if count is None:
        if len(_seen) >= MAX_TRACKED:
            return rank_matmul_reference(a, b, bias)
        count = 0
    if count < ONEDNN_AFTER_CALLS:  # (-1: oneDNN refused this key before)
        if count >= 0:
            _seen[key] = count + 1
        return rank_matmul_reference(a, b, bias)
    op = _onednn_linear()
    if not op:
        return rank_matmul_reference(a, b, bias)
    try:
        return op(a, b.t(), bias, "none", [], "")  # a @ (b^T)^T + bias: the op takes the weight as (n, k)
    except RuntimeError:  # a layout it does not take: this key stays on the reference
        _seen[key] = -1
        return rank_matmul_reference(a, b, bias)
