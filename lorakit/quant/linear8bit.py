"""A frozen 8-bit linear layer (row-wise absmax int8) whose state dict matches bitsandbytes' ``Linear8bitLt``.

Per output row ``o`` (LLM.int8(), Dettmers et al. 2022, https://arxiv.org/abs/2208.07339; the weight as
bitsandbytes stores it, activations never quantized, so no outlier decomposition is needed)::

    SCB[o]   = max_i |W[o, i]|                       (of W cast to fp16, as bitsandbytes does)
    CB[o, i] = round(W[o, i] * (127 / SCB[o]))        int8
    W       ~= CB * SCB[:, None] * (1 / 127)          fp32
    y        = x @ W.T + b                            (dequantize-then-matmul in the compute dtype)

State dict: ``weight`` int8 (out, in), ``SCB`` fp32 (out,), ``weight_format`` uint8 0 (row-major).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.quant.matmul import DequantLinearModule

_INV_127 = 7.874015718698502e-3  # fp32(1 / 127), the constant of bitsandbytes' int8_vectorwise_dequant


def quantize_8bit_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization: returns ``CB`` int8 (out, in) and ``SCB`` fp32 (out,)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight (out, in), got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().to(torch.float16)  # bitsandbytes quantizes the fp16 copy
    scb = w.abs().amax(dim=1).float()  # (out,)
    cb = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)  # (out, in)
    return cb, scb


def dequantize_8bit_rowwise(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """``CB * SCB[:, None] / 127`` in fp32, shape (out, in)."""
    return cb.float() * scb.view(-1, 1) * _INV_127


class Int8Params(nn.Parameter):
    """Frozen int8 weight (out, in); its row scales live on the owning :class:`Linear8bitLt` as ``SCB``."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = False) -> Int8Params:
        if requires_grad:
            raise ValueError("Int8Params is frozen: requires_grad must be False (train LoRA adapters instead)")
        return torch.Tensor._make_subclass(cls, torch.empty(0, dtype=torch.int8) if data is None else data, False)

    def __deepcopy__(self, memo: dict) -> Int8Params:
        return type(self)(self.data.clone())


class Linear8bitLt(DequantLinearModule):
    """Frozen 8-bit linear layer: ``weight`` int8 :class:`Int8Params`, buffer ``SCB`` fp32, ``bias``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: dtype of the dequantized weight and of the matmul; None = the input's dtype.
        threshold: bitsandbytes' ``llm_int8_threshold``, kept as ``self.threshold``. Activations are never
            quantized here (dequantize-then-matmul), so every column is computed as LLM.int8() computes its
            outliers, whatever the threshold.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        threshold: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0:
            raise ValueError(f"llm_int8_threshold must be a number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = Int8Params(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, threshold: float = 0.0
    ) -> Linear8bitLt:
        """Quantize an ``nn.Linear`` into a new layer (bias copied in its dtype)."""
        layer = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                    threshold=threshold, device=linear.weight.device)  # fmt: skip
        layer.set_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight by ``weight`` (out, in) quantized row-wise to int8."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match (out_features, in_features) = "
                f"{(self.out_features, self.in_features)}"
            )
        cb, scb = quantize_8bit_rowwise(weight)
        self.weight = Int8Params(cb)
        self.SCB = scb

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``(out_features, in_features)``."""
        return dequantize_8bit_rowwise(self.weight, self.SCB).to(dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Linear8bitLt:
        # .to(dtype) / .half() must keep SCB in fp32 (bitsandbytes' format): convert the device only.
        scb = self._buffers.pop("SCB")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["SCB"] = scb
        device = fn(torch.empty(0, device=scb.device)).device
        if device != scb.device:
            self.SCB = scb.to(device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[f"{prefix}weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        fmt = state_dict.pop(f"{prefix}weight_format", None)
        if fmt is not None and int(fmt) != 0:
            raise ValueError(f"{prefix}weight_format={int(fmt)}: only 0 (row-major int8) is supported")
        weight = state_dict.get(f"{prefix}weight")
        if weight is not None and weight.dtype != torch.int8:
            raise ValueError(
                f"{prefix}weight is {weight.dtype}, expected int8 with {prefix}SCB; to quantize full-precision "
                "weights call set_weight(...) or lorakit.quantize_model"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not isinstance(self.weight, Int8Params):  # load_state_dict(assign=True) made it a plain Parameter
            self.weight = Int8Params(self.weight.data)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )
