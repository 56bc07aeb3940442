"""SwiGLU gating ``a = silu(g) * u`` (Shazeer, https://arxiv.org/abs/2002.05202) and its backward.

    silu(g) = g * sigmoid(g)
    da/dg   = u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    da/du   = silu(g)

The pure-PyTorch reference runs in fp32 and casts back; on CUDA with Triton installed the same functions run
one fused elementwise kernel each (``lorakit.kernels._triton.swiglu``), chosen by ``backend="auto"``.

Without Triton, fp32/fp64 tensors take torch's own fused ops (``silu``, ``silu_backward``) in as few passes over
the (M, I) activations as the formula allows, writing in place where a temporary is ours: on CPU the reference's
seven elementwise passes (and their fresh allocations) cost more than the rank-16 adapters of the MLP.
Half-precision tensors keep the reference (one rounding at the end instead of one per op).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.backend import use_triton


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in fp32; fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def swiglu_forward_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` computed in (at least) fp32, returned in ``g.dtype``. g, u: (..., I)."""
    gf = _upcast(g)
    return (gf * torch.sigmoid(gf) * _upcast(u)).to(g.dtype)


def swiglu_backward_reference(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) for ``a = silu(g) * u`` given ``da``, in (at least) fp32, returned in ``g.dtype``."""
    gf, uf, daf = _upcast(g), _upcast(u), _upcast(da)
    sig = torch.sigmoid(gf)
    dg = daf * uf * sig * (1.0 + gf * (1.0 - sig))
    du = daf * gf * sig
    return dg.to(g.dtype), du.to(g.dtype)


def _native(t: torch.Tensor) -> bool:
    """fp32/fp64: torch's fused ops give the reference's values without an upcast."""
    return t.dtype in (torch.float32, torch.float64)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(g) * u`` with the backend ``backend`` ("auto": Triton on CUDA when installed, else torch)."""
    if g.shape != u.shape:
        raise ValueError(f"gate and up shapes must match, got {tuple(g.shape)} and {tuple(u.shape)}")
    if use_triton(g, backend):
        from lorakit.kernels._triton.swiglu import swiglu_forward_triton

        return swiglu_forward_triton(g, u)
    if _native(g) and g.dtype == u.dtype:
        return F.silu(g).mul_(u)  # 2 passes, 1 allocation
    return swiglu_forward_reference(g, u)


def swiglu_backward(
    da: torch.Tensor, g: torch.Tensor, u: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of ``silu(g) * u`` with the backend ``backend`` (see ``swiglu_forward``)."""
    if use_triton(g, backend):
        from lorakit.kernels._triton.swiglu import swiglu_backward_triton

        return swiglu_backward_triton(da, g, u)
    if _native(g) and g.dtype == u.dtype == da.dtype:
        return swiglu_backward_(da * u, g, F.silu(g).mul_(da))
    return swiglu_backward_reference(da, g, u)


def swiglu_for_backward(
    g: torch.Tensor, u: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """``(a, grads)`` for a backward that recomputes ``a = silu(g) * u`` and then needs ``grads(da) -> (dg, du)``.

    On the torch fp32/fp64 path ``silu(g)`` is computed once for both, and ``grads`` writes into its own
    temporaries and into ``da``, which must be a tensor the caller owns and no longer needs.
    """
    if use_triton(g, backend) or not (_native(g) and g.dtype == u.dtype):
        return swiglu_forward(g, u, backend), lambda da: swiglu_backward(da, g, u, backend)
    silu_g = F.silu(g)  # (..., I)

    def grads(da: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        du = silu_g.mul_(da)  # da * silu(g), in silu_g's storage
        return swiglu_backward_(da.mul_(u), g, du)  # dg in da's storage

    return silu_g * u, grads


def swiglu_backward_(da_u: torch.Tensor, g: torch.Tensor, du: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) from ``da_u = da * u`` and ``du = da * silu(g)``, computing ``dg`` into ``da_u``'s storage.

    ``dg = silu'(g) * da * u`` is one ``silu_backward`` pass; ``da_u`` is consumed (overwritten). fp32/fp64 only.
    """
    return torch.ops.aten.silu_backward.grad_input(da_u, g, grad_input=da_u), du


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, u: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        ctx.backend = backend
        return swiglu_forward(g, u, backend)

    @staticmethod
    def backward(ctx: Any, da: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, u = ctx.saved_tensors
        dg, du = swiglu_backward(da.contiguous(), g, u, ctx.backend)
        return dg, du, None


def swiglu(g: torch.Tensor, u: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Differentiable ``silu(g) * u`` that saves only g and u (autograd on the plain formula saves silu(g)
    too). g, u: (..., I) -> (..., I)."""
    return _SwiGLU.apply(g, u, backend)
