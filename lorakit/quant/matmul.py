"""``x @ W.T + b`` for a quantized W, dequantized in forward and again in backward.

Saving the dequantized W for backward would keep a full-precision copy of every quantized layer alive during
training (QLoRA's memory saving gone); recomputing it costs one more dequantization per layer in backward,
as bitsandbytes' ``MatMul4Bit`` does. Gradients flow to ``x`` (and ``b`` if it requires grad), never to W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


class DequantLinearModule(nn.Module):
    """Forward shared by the quantized linears: ``y = x W^T + b`` with ``W = self.dequantize(dtype)``.

    Subclasses define ``dequantize(dtype) -> (out, in)``, ``compute_dtype`` (None: the input's dtype) and
    ``bias``. The input is cast to the compute dtype and the output back to the input's dtype; the weight is
    dequantized in the forward and again in the backward (``dequant_linear``), never saved.
    """

    compute_dtype: torch.dtype | None
    bias: torch.Tensor | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return dequant_linear(x, self.dequantize, bias).to(input_dtype)  # (..., out)
