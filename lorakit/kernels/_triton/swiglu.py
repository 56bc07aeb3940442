"""SwiGLU forward/backward as one elementwise Triton kernel each (reference: ``lorakit.kernels.swiglu``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, a_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(da_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    du = da * g * sig
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_forward_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u; g, u: (..., I) -> (..., I) in g.dtype."""
    g, u = g.contiguous(), u.contiguous()
    a = torch.empty_like(g)
    n = g.numel()
    _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](g, u, a, n, BLOCK=_BLOCK)
    return a


def swiglu_backward_triton(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of silu(g) * u; all (..., I), returned in g.dtype."""
    da, g, u = da.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(g)
    n = g.numel()
    _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](da, g, u, dg, du, n, BLOCK=_BLOCK)
    return dg, du
