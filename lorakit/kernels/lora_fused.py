"""Fused LoRA autograd for a linear layer and for a gate/up/down (SwiGLU) MLP.

LoRA (Hu et al., https://arxiv.org/abs/2106.09685) with a frozen base weight W (out, in):

    x_d = dropout(x) = x * m / (1 - p)          # m ~ Bernoulli(1 - p) (nn.Dropout's draws), (M, in); x_d = x when p = 0
    h   = x_d A^T                               # (M, r)
    y   = x W^T + b + s (h B^T + b_B)           # (M, out)

Backward, given dY (M, out):

    dB   = s dY^T h                 (out, r)        db_B = s sum_M dY
    dh   = s dY B                   (M, r)
    dA   = dh^T x_d                 (r, in)
    dX   = dY W + (dh A) * m / (1 - p)              # W gets no gradient

Only x (shared with the other projections reading the same input), the dropout mask (bool) and s h (M, r) are
saved; the rank-r products are written first and the base GEMM accumulates into them (no extra pass over y or
dX). Autograd through ``base(x) + lora_B(lora_A(dropout(x))) * s`` saves x_d and h in the adapter's dtype (an fp32
copy of x over a bf16 base) and builds the output in three additions. A 4-bit base passes a zero-arg
callable that dequantizes W; it is called in the forward and again in the backward and never saved, so the
dequantized weight lives only while one matmul needs it.

The six rank-r products go through ``lorakit.kernels.small_matmul.rank_matmul`` (oneDNN on CPU where it is
faster for these shapes; the base GEMMs stay torch's). Everything runs in the compute dtype: the autocast dtype
when autocast is on, else x's dtype. The adapter weights are cast to it for the matmuls (fp32 accumulation
inside), and their gradients are returned in the adapters' own dtype. Over a bf16 base this differs from the
plain path, which runs an fp32 adapter on an fp32 copy of x, by bf16 rounding of the adapter branch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.kernels.small_matmul import rank_matmul
from lorakit.kernels.swiglu import swiglu_for_backward, swiglu_forward

WeightOrFn = torch.Tensor | Callable[[], torch.Tensor]


@dataclass
class LoraProjection:
    """One LoRA-adapted projection for ``lora_mlp``: frozen base plus an optional adapter.

    ``weight`` is the base weight (out, in) or a zero-arg callable returning it (4-bit bases); ``lora_A``
    (r, in) and ``lora_B`` (out, r) are the adapter, or both None for a projection without one.
    """

    weight: WeightOrFn
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_p: float = 0.0
    lora_B_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.lora_A is None) != (self.lora_B is None):
            raise ValueError("lora_A and lora_B must both be tensors or both be None")
        if self.lora_B_bias is not None and self.lora_B is None:
            raise ValueError("lora_B_bias given without lora_B")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if isinstance(self.weight, torch.Tensor) and self.weight.requires_grad:
            raise ValueError(
                "the base weight requires grad, but the fused LoRA path gives it no gradient; freeze it "
                "(requires_grad_(False)) or use the plain autograd path"
            )
        if self.bias is not None and self.bias.requires_grad:
            raise ValueError("the base bias requires grad, but the fused LoRA path gives it no gradient")

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (out, in) in ``dtype`` (dequantized now if ``weight`` is a callable)."""
        w = self.weight() if callable(self.weight) else self.weight
        return w.to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off (a no-op context when it is off already: entering autocast costs ~5 us)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _projection_forward(
    x: torch.Tensor, proj: LoraProjection, training: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y = x W^T + b + s (dropout(x) A^T B^T + b_B); returns (y (M, out), mask (M, in) bool or None, s h (M, r)).

    The rank-r product is written first and the base GEMM accumulates into it (``addmm_`` with beta = 1 reads y
    inside the GEMM), instead of a base GEMM followed by a rank-r ``addmm_``, which reads and writes all of y
    again for 2 r FLOPs per element; s is applied to the (M, r) h, not to y.
    """
    w = proj.base_weight(dtype)
    bias = _cast(proj.bias, dtype)
    if proj.lora_A is None:
        return F.linear(x, w, bias), None, None
    mask = None
    x_d = x
    if training and proj.dropout_p > 0:
        # native_dropout is what nn.Dropout runs in training (F.dropout dispatches to it on CPU and CUDA), so the
        # fused and the plain path drop the same entries from the same RNG state (reentrant checkpointing may run
        # one and recompute with the other); it also returns the mask, in one pass
        x_d, mask = torch.native_dropout(x, proj.dropout_p, True)  # (M, in); mask (M, in) bool
    hs = rank_matmul(x_d, _cast(proj.lora_A, dtype).t()).mul_(proj.scaling)  # (M, r): s h
    b_t = _cast(proj.lora_B, dtype).t()  # (r, out)
    if proj.lora_B_bias is not None:
        lora_bias = _cast(proj.lora_B_bias, dtype) * proj.scaling
        bias = lora_bias if bias is None else bias + lora_bias
    y = rank_matmul(hs, b_t, bias)  # (M, out)
    y.addmm_(x, w.t())
    return y, mask, hs


def _projection_backward(
    dy: torch.Tensor,  # (M, out)
    x: torch.Tensor,  # (M, in), the projection's input before dropout
    mask: torch.Tensor | None,
    hs: torch.Tensor | None,  # (M, r): s h, as saved by _projection_forward
    proj: LoraProjection,
    need_dx: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB, db_B) of one projection, the adapter grads in the adapter's dtype (None if absent).

    With g = s/(1-p) dY B (M, r) and x_m = x * m: dA = g^T x_m, dB = (s h)^T dY read back transposed,
    dX = (g A) * m + dY W, the rank-r product written first and the base GEMM accumulating into it.
    """
    if proj.lora_A is None:
        return (dy @ proj.base_weight(dtype) if need_dx else None), None, None, None
    a, b, s = _cast(proj.lora_A, dtype), _cast(proj.lora_B, dtype), proj.scaling
    # dB^T = (s h)^T dY as an (r, out) product read back transposed: on CPU, one thread, M=1024, r=16, this took
    # 0.23 ms vs 0.44 ms for dY^T h at out=512 (with two threads 0.16 vs 0.23 ms at out=512, but 0.40 vs 0.33 ms
    # at out=1376; not measured on GPU). Either orientation is the same sum.
    d_b = rank_matmul(hs.t(), dy).t().to(proj.lora_B.dtype)  # (out, r)
    d_b_bias = None if proj.lora_B_bias is None else (dy.sum(0) * s).to(proj.lora_B_bias.dtype)  # (out,)
    g = rank_matmul(dy, b).mul_(s if mask is None else s / (1.0 - proj.dropout_p))  # (M, r)
    x_m = x if mask is None else x * mask  # (M, in), transient
    d_a = rank_matmul(g.t(), x_m).to(proj.lora_A.dtype)  # (r, in)
    del x_m
    dx = None
    if need_dx:
        dx = rank_matmul(g, a)  # (M, in)
        if mask is not None:
            dx.mul_(mask)
        dx.addmm_(dy, proj.base_weight(dtype))
    return dx, d_a, d_b, d_b_bias


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (..., d) as (M, d) in ``dtype`` (a view when it is 2-D or contiguous and already in ``dtype``)."""
    return _cast(t if t.dim() == 2 else t.reshape(-1, t.shape[-1]), dtype)


def _unrows(t2: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(M, d) ``t2`` back to ``like``'s leading dims: (..., d)."""
    return t2 if like.dim() == 2 else t2.view(*like.shape[:-1], t2.shape[-1])


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (..., in)
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        lora_b_bias: torch.Tensor | None,
        proj: LoraProjection,
        training: bool,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            x2 = _rows(x, dtype)  # (M, in)
            y, mask, h = _projection_forward(x2, proj, training, dtype)
        ctx.save_for_backward(x2, mask, h)
        ctx.proj, ctx.dtype, ctx.x_dtype = proj, dtype, x.dtype
        return _unrows(y, x)  # (..., out)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, mask, h = ctx.saved_tensors
        with _autocast_off(dy.device.type):
            dy2 = _rows(dy, ctx.dtype)  # (M, out)
            dx, d_a, d_b, d_b_bias = _projection_backward(
                dy2, x2, mask, h, ctx.proj, ctx.needs_input_grad[0], ctx.dtype
            )
        if dx is not None:
            dx = _cast(_unrows(dx, dy), ctx.x_dtype)
        return dx, d_a, d_b, d_b_bias, None, None


def lora_linear(
    x: torch.Tensor,
    weight_or_fn: WeightOrFn,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    lora_B_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T B^T + b_B)`` with the fused backward above.

    Args:
        x: (..., in) activations.
        weight_or_fn: frozen base weight (out, in), or a zero-arg callable returning it (called in the forward
            and again in the backward, never saved: for 4-bit bases).
        bias: frozen base bias (out,) or None.
        lora_A: (r, in) adapter down-projection. lora_B: (out, r) up-projection. lora_B_bias: optional (out,).
        scaling: alpha / r (or alpha / sqrt(r) for rsLoRA).
        dropout_p: LoRA dropout probability, applied to the adapter's input only, when ``training``.

    Returns:
        (..., out) in the compute dtype (autocast dtype, else x's dtype).
    """
    proj = LoraProjection(weight_or_fn, bias, lora_A, lora_B, scaling, dropout_p, lora_B_bias)
    return _LoraLinear.apply(x, lora_A, lora_B, lora_B_bias, proj, training)


def lora_linear_reference(
    x: torch.Tensor,
    weight_or_fn: WeightOrFn,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    lora_B_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain autograd formula ``lora_linear`` must match (no dropout: its mask is random)."""
    w = weight_or_fn() if callable(weight_or_fn) else weight_or_fn
    return F.linear(x, w, bias) + F.linear(F.linear(x, lora_A), lora_B, lora_B_bias) * scaling


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (..., in)
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        lora_b_bias: torch.Tensor | None,
        g: torch.Tensor,  # (out,)
        proj: LoraProjection,  # without the base bias: it is added after the rescaling
        bias: torch.Tensor | None,
        training: bool,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            x2 = _rows(x, dtype)  # (M, in)
            t, mask, h = _projection_forward(x2, proj, training, dtype)  # (M, out): x W^T + s (B A d(x) + b_B)
            g2 = _cast(g.detach(), dtype)
            y = t * g2 if bias is None else torch.addcmul(_cast(bias, dtype), t, g2)  # (M, out)
        ctx.save_for_backward(x2, mask, h, t, g2)
        ctx.proj, ctx.dtype, ctx.x_dtype, ctx.g_dtype = proj, dtype, x.dtype, g.dtype
        return _unrows(y, x)  # (..., out)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, mask, h, t, g2 = ctx.saved_tensors
        with _autocast_off(dy.device.type):
            dy2 = _rows(dy, ctx.dtype)  # (M, out)
            d_g = None
            if ctx.needs_input_grad[4]:
                d_g = (dy2 * t).sum(0).to(ctx.g_dtype)  # (out,) (vecdot measured 1.3x slower on CPU)
            del t
            dt = dy2 * g2  # (M, out)
            dx, d_a, d_b, d_b_bias = _projection_backward(
                dt, x2, mask, h, ctx.proj, ctx.needs_input_grad[0], ctx.dtype
            )
        if dx is not None:
            dx = _cast(_unrows(dx, dy), ctx.x_dtype)
        return dx, d_a, d_b, d_b_bias, d_g, None, None, None


def dora_linear(
    x: torch.Tensor,
    weight_or_fn: WeightOrFn,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    g: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    lora_B_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's linear (``lorakit.variants.dora``) with a fused backward:

        t = x W^T + s (dropout(x) A^T B^T + b_B)        (M, out)
        y = g * t + b                                   g = m / ||W + s B A||_c  (out,), the norm detached

    Backward, given dY: dg = sum_M dY * t, and ``_projection_backward`` with dT = g * dY (the rank-r products
    written first, the base GEMM accumulating into dX: no separate adapter dX or output to add). Saves x, the
    dropout mask, s h (M, r) and t (M, out); the plain path saves the base output for dg as well.

    Args as ``lora_linear``; ``g``: (out,) the magnitude over the detached row norm, differentiable (its gradient
    reaches the magnitude through the division).
    """
    proj = LoraProjection(weight_or_fn, None, lora_A, lora_B, scaling, dropout_p, lora_B_bias)
    if bias is not None and bias.requires_grad:
        raise ValueError("the base bias requires grad, but the fused DoRA path gives it no gradient")
    return _DoraLinear.apply(x, lora_A, lora_B, lora_B_bias, g, proj, bias, training)


def dora_linear_reference(
    x: torch.Tensor,
    weight_or_fn: WeightOrFn,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    g: torch.Tensor,
    lora_B_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain autograd formula ``dora_linear`` must match (no dropout: its mask is random)."""
    w = weight_or_fn() if callable(weight_or_fn) else weight_or_fn
    t = F.linear(x, w) + F.linear(F.linear(x, lora_A), lora_B, lora_B_bias) * scaling
    return t * g if bias is None else t * g + bias


class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (..., H)
        projs: tuple[LoraProjection, LoraProjection, LoraProjection],
        training: bool,
        backend: str,
        *adapter_tensors: torch.Tensor | None,  # (A, B, b_B) of gate, up, down: only for autograd's bookkeeping
    ) -> torch.Tensor:
        gate, up, down = projs
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        with _autocast_off(x.device.type):
            x2 = _cast(x.reshape(-1, x.shape[-1]), dtype)  # (M, H)
            g, mask_g, h_g = _projection_forward(x2, gate, training, dtype)  # (M, I)
            u, mask_u, h_u = _projection_forward(x2, up, training, dtype)  # (M, I)
            act = swiglu_forward(g, u, backend)  # (M, I)
            y, mask_d, h_d = _projection_forward(act, down, training, dtype)  # (M, H)
        # act is recomputed from (g, u) in the backward instead of being saved.
        ctx.save_for_backward(x2, g, u, mask_g, h_g, mask_u, h_u, mask_d, h_d)
        ctx.projs, ctx.dtype, ctx.x_dtype, ctx.backend = projs, dtype, x.dtype, backend
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, g, u, mask_g, h_g, mask_u, h_u, mask_d, h_d = ctx.saved_tensors
        gate, up, down = ctx.projs
        lead = dy.shape[:-1]
        with _autocast_off(dy.device.type):
            dy2 = _cast(dy.reshape(-1, dy.shape[-1]), ctx.dtype)  # (M, H)
            act, swiglu_grads = swiglu_for_backward(g, u, ctx.backend)  # act (M, I) recomputed
            d_act, *grads_d = _projection_backward(dy2, act, mask_d, h_d, down, True, ctx.dtype)
            del act
            dg, du = swiglu_grads(d_act)  # (M, I) each; d_act is ours (consumed)
            del d_act
            need_dx = ctx.needs_input_grad[0]
            dx, *grads_g = _projection_backward(dg, x2, mask_g, h_g, gate, need_dx, ctx.dtype)
            dx_u, *grads_u = _projection_backward(du, x2, mask_u, h_u, up, need_dx, ctx.dtype)
            if dx is not None:
                dx = dx.add_(dx_u).reshape(*lead, dx.shape[-1]).to(ctx.x_dtype)
        return (dx, None, None, None, *grads_g, *grads_u, *grads_d)


def lora_mlp(
    x: torch.Tensor,
    gate: LoraProjection,
    up: LoraProjection,
    down: LoraProjection,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Llama-style MLP ``down(silu(gate(x)) * up(x))`` with LoRA on any of the three projections, fused.

    Saves x, g = gate(x), u = up(x) (M, I) and the small (M, r) adapter activations; silu(g) * u is
    recomputed in the backward (autograd on the plain modules also keeps silu(g), silu(g) * u and the
    adapters' fp32 input copies). The backward is ``_projection_backward`` (see the module docstring) for
    down, then the SwiGLU derivative (``lorakit.kernels.swiglu``), then gate and up, whose dX add up.
    ``backend`` picks the SwiGLU implementation ("auto": Triton on CUDA when installed).

    x: (..., H) -> (..., H).
    """
    tensors: list[torch.Tensor | None] = []
    for proj in (gate, up, down):
        tensors += [proj.lora_A, proj.lora_B, proj.lora_B_bias]
    return _LoraMLP.apply(x, (gate, up, down), training, backend, *tensors)


def lora_mlp_reference(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection) -> torch.Tensor:
    """The plain autograd formula ``lora_mlp`` must match (no dropout: its masks are random)."""

    def proj(t: torch.Tensor, p: LoraProjection) -> torch.Tensor:
        if p.lora_A is None:
            return F.linear(t, p.base_weight(t.dtype), p.bias)
        return lora_linear_reference(t, p.weight, p.bias, p.lora_A, p.lora_B, p.scaling, p.lora_B_bias)

    return proj(F.silu(proj(x, gate)) * proj(x, up), down)
