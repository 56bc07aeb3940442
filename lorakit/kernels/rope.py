"""Rotary position embedding (Su et al., https://arxiv.org/abs/2104.09864), rotate-half convention of
transformers' ``apply_rotary_pos_emb``:

    rotate_half([x_1, x_2]) = [-x_2, x_1]
    out = x * cos + rotate_half(x) * sin
    dx  = dout * cos + rotate_half^T(dout * sin),   rotate_half^T([v_1, v_2]) = [v_2, -v_1]

x: (B, nh, T, hd); cos, sin: (B or 1, T, hd). The Triton path (CUDA, or TRITON_INTERPRET=1) saves only cos and
sin, which the attention layers share, and writes one output per call.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.kernels.backend import use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with cos, sin broadcast over heads. x: (B, nh, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return x * cos + _rotate_half(x) * sin


class _RoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from lorakit.kernels._triton.rope import rope_triton

        ctx.save_for_backward(cos, sin)
        return rope_triton(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from lorakit.kernels._triton.rope import rope_triton

        cos, sin = ctx.saved_tensors
        return rope_triton(dout, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Apply RoPE to x: (B, nh, T, hd) with cos, sin: (B or 1, T, hd); cos and sin get no gradient."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be (B, nh, T, hd) with even hd, got shape {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.shape[1:] != (x.shape[2], x.shape[3]) or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"cos and sin must be (B={x.shape[0]} or 1, T={x.shape[2]}, hd={x.shape[3]}), "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if use_triton(x, backend):
        return _RoPETriton.apply(x, cos, sin)
    return rope_reference(x, cos, sin)
