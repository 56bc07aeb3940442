"""Fused paths on an adapted model: fused LoRA linears, fused SwiGLU LoRA MLPs, RMSNorm kernels.

Linear layers already take ``lorakit.kernels.lora_fused.lora_linear`` by default in training where it computes
what the plain path computes (``LoraLinear.use_fused = None``). ``enable_fused(model)`` (opt-in) switches every
``LoraLinear`` to it wherever it applies (``use_fused = True``) and replaces each
Llama-style MLP *instance* (``down(silu(gate(x)) * up(x))``) by a ``FusedLoraMLP`` that runs
``lorakit.kernels.lora_fused.lora_mlp``: it saves x, gate(x), up(x) and the rank-r adapter activations for the
backward instead of autograd's silu(g), silu(g) * u and fp32 input copies, and recomputes the SwiGLU.

No model class is patched. ``FusedLoraMLP`` takes over the MLP's own children (``gate_proj``, ``up_proj``,
``down_proj``, ``act_fn``), so every parameter keeps its name (saved adapters stay PEFT's keys); the original
instance is kept outside the module tree and put back, with those children, by ``disable_fused``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.dispatch import FUSED, choose_path, frozen_base, fused_weight, has_hooks
from lorakit.kernels.lora_fused import LoraProjection, lora_mlp
from lorakit.kernels.rms_norm import RMSNormWithKernel
from lorakit.layers import LoraLinear

#: transformers MLP classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP"})


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        type(module).__name__ in SWIGLU_MLP_CLASSES
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(act).__name__ in ("SiLU", "SiLUActivation")  # torch's, or transformers' own
    )


def _projection(layer: nn.Module, x: torch.Tensor) -> Any:
    """The ``LoraProjection`` of one MLP projection, or None if it cannot take the fused path now (the rules of
    ``lorakit.dispatch.choose_path`` with ``mlp=True``; the fused MLP calls neither the projection nor its base,
    so any hook on them keeps the plain path)."""
    if has_hooks(layer):
        return None
    if not isinstance(layer, LoraLinear):  # a projection without adapters
        return LoraProjection(fused_weight(layer, x, False), layer.bias) if frozen_base(layer, mlp=True) else None
    adapters = layer._adapters_to_run()
    if choose_path(layer, x, adapters, extra_args=False, mlp=True) != FUSED:
        return None
    base = layer.base_layer
    weight = fused_weight(base, x, False)
    return adapters[0].projection(weight, base.bias) if adapters else LoraProjection(weight, base.bias)


class FusedLoraMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` through ``lora_mlp`` when every projection allows it, else the plain path.

    Holds the MLP's ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` under the same names.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        object.__setattr__(self, "original", mlp)  # not a submodule: its parameters are ours already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = [_projection(m, x) for m in (self.gate_proj, self.up_proj, self.down_proj)]
        if any(p is None for p in projections):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return lora_mlp(x, *projections, training=self.training)

    def restore(self) -> nn.Module:
        """The original MLP instance, holding this module's current children."""
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            setattr(self.original, name, getattr(self, name))
        self.original.train(self.training)
        return self.original


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and (
        getattr(module, "weight", None) is not None
    )


def enable_fused(model: nn.Module, mlp: bool = True, norm_kernels: bool | None = None) -> None:
    """Fused LoRA linears everywhere; with ``mlp``, fused SwiGLU MLPs where the model has them; with
    ``norm_kernels`` (None: only for norms whose weight is on CUDA, where the Triton kernel runs), Llama-style
    RMSNorm instances run through ``lorakit.kernels.rms_norm`` (wrapped as ``RMSNormWithKernel``)."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.use_fused = True
    for name, module in list(model.named_modules()):
        # modules with hooks (accelerate's offloading, user hooks) are kept: a replacement would drop the hooks
        if _is_rms_norm(module) and (norm_kernels or (norm_kernels is None and module.weight.is_cuda)) and not (
            has_hooks(module)
        ):
            _replace(model, name, RMSNormWithKernel(module))
    if mlp:
        for name, module in list(model.named_modules()):
            if _is_swiglu_mlp(module) and not has_hooks(module) and any(
                isinstance(getattr(module, n), LoraLinear) for n in ("gate_proj", "up_proj", "down_proj")
            ):
                _replace(model, name, FusedLoraMLP(module))


def disable_fused(model: nn.Module, plain: bool = False) -> None:
    """Undo ``enable_fused``: the original MLP instances back, and linear layers on their default
    (``use_fused = None``), or with ``plain`` on the plain autograd path everywhere (``use_fused = False``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedLoraMLP):
            _replace(model, name, module.restore())
        elif isinstance(module, RMSNormWithKernel):
            _replace(model, name, module.restore())
        elif isinstance(module, LoraLinear):
            module.use_fused = False if plain else None
