"""``x @ W.T + b`` for a quantized W, dequantized in forward and again in backward.

Saving the dequantized W for backward would keep a full-precision copy of every quantized layer alive during
training (QLoRA's memory saving gone); recomputing it costs one more dequantization per layer in backward,
as bitsandbytes' ``MatMul4Bit`` does. Gradients flow to ``x`` (and ``b`` if it requires grad), never to W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, dequant: Callable[[torch.dtype], torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.dequant = dequant
        ctx.has_bias = bias is not None
        return F.linear(x, dequant(x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.dequant(grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias


def dequant_linear(
    x: torch.Tensor, dequant: Callable[[torch.dtype], torch.Tensor], bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, dequant(x.dtype), bias)`` whose backward re-dequantizes instead of saving the weight.

    ``dequant(dtype)`` must return the weight ``(out, in)`` in ``dtype``.
    """
    return _DequantLinear.apply(x, dequant, bias)
