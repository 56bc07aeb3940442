"""Quantization: NF4/FP4 4-bit (QLoRA) and row-wise int8, bit-compatible with bitsandbytes.

The helpers below treat lorakit's ``Linear4bit`` / ``Linear8bitLt`` and bitsandbytes' modules of the same names
alike, by duck typing (bitsandbytes is never imported): a 4-bit layer is one whose ``weight`` carries a
``quant_state``; an 8-bit layer has an int8 ``weight`` and row scales ``SCB``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.quant.linear4bit import Linear4bit, Params4bit
from lorakit.quant.linear8bit import (
    Int8Params,
    Linear8bitLt,
    dequantize_8bit_rowwise,
    quantize_8bit_rowwise,
)
from lorakit.quant.nf4 import QuantState, dequantize_4bit, quantize_4bit

__all__ = [
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "Params4bit",
    "QuantState",
    "dequantize_4bit",
    "dequantize_weight",
    "is_quantized_linear",
    "quantize_4bit",
    "requantize_weight_",
    "restore_weight_",
    "snapshot_weight",
]


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a 4-bit or 8-bit linear layer (lorakit's or bitsandbytes')."""
    return _kind(module) is not None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight dequantized to fp32, shape ``(out_features, in_features)``."""
    kind = _kind(module)
    if kind == "4bit":
        if getattr(module, "quant_state_exposed", False):  # lorakit's, its state in parameters (FSDP)
            return module.dequantize(torch.float32)
        state = _bnb_cpu_layout_restored(module)
        return dequantize_4bit(module.weight, state, dtype=torch.float32)
    if kind == "8bit":
        return dequantize_8bit_rowwise(module.weight.data, _scb(module))
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer (see is_quantized_linear)")


def requantize_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the layer's weight by ``weight`` (out, in), quantized with the layer's own settings.

    4-bit: same quant_type, blocksize, double quantization, storage dtype and original dtype (``weight`` is
    cast to it first, as at load time). 8-bit: row-wise absmax int8.
    """
    kind = _kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a quantized linear layer (see is_quantized_linear)")
    if isinstance(module, (Linear4bit, Linear8bitLt)):
        module.set_weight(weight.to(module.weight_quant_state().dtype) if kind == "4bit" else weight)
        return
    param = module.weight
    if kind == "4bit":  # bitsandbytes' Linear4bit: build a state of its own QuantState class
        old = _bnb_cpu_layout_restored(module)
        if tuple(weight.shape) != tuple(old.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the layer's {tuple(old.shape)}")
        packed, state = quantize_4bit(
            weight.detach().to(device=param.device, dtype=old.dtype), old.blocksize, old.quant_type, old.nested,
            param.dtype,
        )  # fmt: skip
        param.data = packed
        param.quant_state = type(old).from_dict(state.as_dict(packed=True), device=param.device)
        return
    cb, scb = quantize_8bit_rowwise(weight.to(param.device))  # bitsandbytes' Linear8bitLt
    param.data = cb
    for holder in (param, getattr(module, "state", None)):
        if getattr(holder, "CB", None) is not None:
            holder.CB = cb
        if getattr(holder, "SCB", None) is not None:
            holder.SCB = scb


def snapshot_weight(module: nn.Module) -> dict[str, Any]:
    """A copy of the layer's exact quantized weight (packed bytes and quant state, or int8 and row scales) and bias,
    for :func:`restore_weight_`. Costs one more copy of the quantized weight while it is kept."""
    kind = _kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a quantized linear layer (see is_quantized_linear)")
    bias = getattr(module, "bias", None)
    snap: dict[str, Any] = {"kind": kind, "bias": None if bias is None else bias.detach().clone()}
    if kind == "4bit":
        state = _bnb_cpu_layout_restored(module)
        snap["data"] = module.weight.data.clone()
        snap["quant_state"] = type(state).from_dict(state.as_dict(packed=True), device=module.weight.device)
    else:
        snap["data"], snap["scb"] = module.weight.data.clone(), _scb(module).clone()
    return snap


def restore_weight_(module: nn.Module, snap: dict[str, Any]) -> None:
    """Put back the exact weight and bias of :func:`snapshot_weight` (no requantization: bit for bit)."""
    if snap["kind"] == "4bit":
        if isinstance(module, Linear4bit):
            module.weight = Params4bit(snap["data"], False, snap["quant_state"], snap["data"].dtype)
        else:  # bitsandbytes' Linear4bit
            module.weight.data = snap["data"]
            module.weight.quant_state = snap["quant_state"]
    elif isinstance(module, Linear8bitLt):
        module.weight = Int8Params(snap["data"])
        module.SCB = snap["scb"]
    else:  # bitsandbytes' Linear8bitLt
        module.weight.data = snap["data"]
        for holder in (module.weight, getattr(module, "state", None)):
            if getattr(holder, "CB", None) is not None:
                holder.CB = snap["data"]
            if getattr(holder, "SCB", None) is not None:
                holder.SCB = snap["scb"]
    if snap["bias"] is not None:
        with torch.no_grad():
            module.bias.copy_(snap["bias"])


def _kind(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if getattr(weight, "quant_state", None) is not None or getattr(module, "quant_state_exposed", False):
        return "4bit"
    if weight.dtype == torch.int8 and _scb(module) is not None:
        return "8bit"
    return None


def _scb(module: nn.Module) -> torch.Tensor | None:
    """Row scales: our buffer ``module.SCB``, or bitsandbytes' ``weight.SCB`` / ``state.SCB``."""
    for holder in (module, module.weight, getattr(module, "state", None)):
        scb = getattr(holder, "SCB", None)
        if isinstance(scb, torch.Tensor):
            return scb
    return None


def _bnb_cpu_layout_restored(module: nn.Module) -> QuantState:
    """The weight's quant state, in the standard layout.

    bitsandbytes' Linear4bit repacks its weight for its AVX512-BF16 CPU kernel after an eval-mode no-grad
    forward; its own ``state_dict()`` converts it back, so call that (nothing is imported).
    """
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        module.state_dict()
        state = module.weight.quant_state
        if state.absmax.dim() == 2:  # without double quant it leaves absmax as (in / blocksize, out), bf16
            state.absmax = state.absmax.T.reshape(-1).float()
    return module.weight.quant_state
