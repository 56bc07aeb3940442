"""RMSNorm (Zhang & Sennrich, https://arxiv.org/abs/1910.07467) as in transformers' LlamaRMSNorm.

    rstd = 1 / sqrt(mean(x^2) + eps)          (fp32)
    y    = w * (x * rstd).to(x.dtype)
    dx   = rstd * (dy w - x_hat * mean(dy w x_hat)),   x_hat = x * rstd
    dw   = sum_rows dy * x_hat

The Triton path (CUDA, or TRITON_INTERPRET=1) saves x and rstd (M,) only; dw, needed only when the norm weight
trains, is computed in torch from them. ``RMSNormWithKernel`` wraps an existing RMSNorm module (weight +
``variance_epsilon``) so a model can use the kernel without patching its class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.kernels.backend import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' LlamaRMSNorm forward. x: (..., H), weight: (H,) -> (..., H)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return weight * (xf * rstd).to(x.dtype)


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from lorakit.kernels._triton.rms_norm import rms_norm_forward_triton

        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, H)
        y, rstd = rms_norm_forward_triton(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from lorakit.kernels._triton.rms_norm import rms_norm_backward_triton

        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()  # (M, H)
        dx = rms_norm_backward_triton(dy2, x2, weight, rstd).reshape(dy.shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy2.float() * (x2.float() * rstd[:, None]).to(x2.dtype).float()).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x: (..., H) with weight (H,); ``backend`` "auto" (Triton on CUDA), "triton" or "torch"."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be (H={x.shape[-1]},), got shape {tuple(weight.shape)}")
    if use_triton(x, backend):
        return _RMSNormTriton.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class RMSNormWithKernel(nn.Module):
    """Runs ``rms_norm`` in place of an RMSNorm module (``weight`` (H,), ``variance_epsilon``).

    It holds the module's own ``weight`` parameter under the same name, so state-dict keys, saved adapters
    (a norm in ``modules_to_save``) and optimizers see no change; the module itself is kept, not as a submodule,
    in ``base_layer`` to be put back. Replacing a model's norm instances with this (as ``get_peft_model`` replaces
    linears) needs no change to the model class.
    """

    def __init__(self, base_layer: nn.Module, backend: str = "auto") -> None:
        super().__init__()
        if not hasattr(base_layer, "weight") or not hasattr(base_layer, "variance_epsilon"):
            raise ValueError(f"{type(base_layer).__name__} has no weight/variance_epsilon: not a Llama-style RMSNorm")
        self.weight = base_layer.weight  # the same Parameter
        self.variance_epsilon = base_layer.variance_epsilon
        object.__setattr__(self, "base_layer", base_layer)  # not a submodule: its parameter is ours already
        self.backend = backend
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.backend)

    def restore(self) -> nn.Module:
        """The original norm instance, holding this module's current weight and mode."""
        self.base_layer.weight = self.weight
        self.base_layer.train(self.training)
        return self.base_layer
