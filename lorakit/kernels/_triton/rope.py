"""Rotary position embedding (rotate-half convention) forward and backward (reference: ``lorakit.kernels.rope``).

One program per (batch, head, position) row: out_1 = x_1 c_1 - x_2 s_1, out_2 = x_2 c_2 + x_1 s_2 over the two
halves of the head dimension. The backward is the same rotation with the sign of sin flipped (BACKWARD=1):
dx_1 = d_1 c_1 + d_2 s_2, dx_2 = d_2 c_2 - d_1 s_1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_heads,
    seq_len,
    cs_batch_stride,
    half,
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # over (B, nh, T)
    t = row % seq_len
    b = row // (n_heads * seq_len)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    x_base = x_ptr + row * 2 * half
    cs = b * cs_batch_stride + t * 2 * half
    x1 = tl.load(x_base + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + half + cols, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + cs + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + half + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + half + cols, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    out_base = out_ptr + row * 2 * half
    tl.store(out_base + cols, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_base + half + cols, o2.to(out_ptr.dtype.element_ty), mask=mask)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate x: (B, nh, T, hd) by cos, sin: (B or 1, T, hd); ``backward`` applies the transposed rotation."""
    batch, n_heads, seq_len, head_dim = x.shape
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    cs_batch_stride = 0 if cos.shape[0] == 1 else seq_len * head_dim
    half = head_dim // 2
    _rope[(batch * n_heads * seq_len,)](
        x,
        cos,
        sin,
        out,
        n_heads,
        seq_len,
        cs_batch_stride,
        half,
        BACKWARD=backward,
        BLOCK=triton.next_power_of_2(half),
    )
    return out
