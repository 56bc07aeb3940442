"""PEFT's ``get_layer_status`` / ``get_model_status``: what each adapted layer holds, which adapters are active,
merged or trainable, and where their weights are; the same dataclasses and field values as PEFT 0.21.2.

A layer is a LoRA wrapper (``lora.Linear``, ``lora.Embedding``, ``lora.Linear4bit``, ``lora.Linear8bitLt``) or a
``ModulesToSaveWrapper``. Model-wide values that differ between layers read ``"irregular"``, as in PEFT.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lorakit import quant
from lorakit.layers import LORA_WRAPPERS, LoraEmbedding, ModulesToSaveWrapper
from lorakit.lora_model import LoraModel
from lorakit.model import PeftModel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapted layer (PEFT's fields)."""

    name: str
    """The layer's name under the LoRA model, e.g. ``model.model.layers.0.self_attn.q_proj``."""
    module_type: str
    """PEFT's class name of the layer: ``lora.Linear``, ``lora.Embedding``, ``ModulesToSaveWrapper``, ..."""
    enabled: bool
    """False while adapters are disabled."""
    active_adapters: list[str]
    """The model's active adapters (for a LoRA layer, also those it does not hold, as in PEFT)."""
    merged_adapters: list[str]
    """Adapters folded into the layer's base weight, in merge order."""
    requires_grad: dict[str, bool | Irregular]
    """{adapter: whether its parameters in this layer train}; ``"irregular"`` if only some do."""
    available_adapters: list[str]
    """The adapters this layer holds, sorted."""
    devices: dict[str, list[str]]
    """{adapter: sorted device types of its parameters in this layer}."""
    quantization_backend: str | None
    """Always None for LoRA in PEFT 0.21.2 (a quantized base shows in ``module_type`` instead)."""


@dataclass
class TunerModelStatus:
    """The whole model (PEFT's fields); values that differ between layers read ``"irregular"``."""

    base_model_type: str
    """The transformers model's class name (``"other"`` for a plain torch module)."""
    adapter_model_type: str
    """``"LoraModel"`` for a ``PeftModel``, else ``"None"``."""
    peft_types: dict[str, str]
    """{adapter: ``"LORA"``} (empty unless a ``PeftModel``)."""
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    """Adapters merged in every layer that holds them; ``"irregular"`` if merged in some only."""
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _all_or_none(values: list[bool | str]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _module_type(module: nn.Module) -> str:
    """PEFT's ``repr(module).partition("(")[0]`` for the layer PEFT would have created here."""
    if isinstance(module, ModulesToSaveWrapper):
        return "ModulesToSaveWrapper"
    if isinstance(module, LoraEmbedding):
        return "lora.Embedding"
    base = module.base_layer
    if quant.is_quantized_linear(base):  # PEFT's bitsandbytes layer classes; lorakit's quantized linears alike
        return "lora.Linear4bit" if getattr(base.weight, "quant_state", None) is not None else "lora.Linear8bitLt"
    return "lora.Linear"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """PEFT's ``get_layer_status``: one ``TunerLayerStatus`` per adapted layer of ``model`` (a ``PeftModel``, its
    ``LoraModel``, or a module holding lorakit's wrappers), in module order. Raises ``ValueError`` if none.

    A LoRA layer lists the model's active adapters, held or not (PEFT's); of a bare module holding wrappers (no
    ``LoraModel`` to ask), only the active ones it holds."""
    root = model.base_model if isinstance(model, PeftModel) else model
    model_active = root.active_adapters if isinstance(root, LoraModel) else None
    layers: list[TunerLayerStatus] = []
    for name, module in root.named_modules():
        if isinstance(module, LORA_WRAPPERS):
            holders = dict(module.adapters.items())
            active = list(model_active if model_active is not None else module.active_adapters)
            merged = list(module.merged_adapters)
        elif isinstance(module, ModulesToSaveWrapper):
            holders = dict(module.modules_to_save.items())
            active = [module.active_adapter] if module.active_adapter is not None else []
            merged = []
        else:
            continue
        layers.append(
            TunerLayerStatus(
                name=name,
                module_type=_module_type(module),
                enabled=not module.disabled,
                active_adapters=active,
                merged_adapters=merged,
                requires_grad={
                    key: _all_or_none([p.requires_grad for p in holder.parameters()])
                    for key, holder in holders.items()
                },
                available_adapters=sorted(holders),
                devices={key: sorted({p.device.type for p in holder.parameters()}) for key, holder in holders.items()},
                quantization_backend=None,
            )
        )
    if not layers:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return layers


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """PEFT's ``get_model_status``: the layers' statuses combined (see ``TunerModelStatus``)."""
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {key: config.peft_type.value for key, config in model.peft_config.items()}
        adapter_model_type = type(model.base_model).__name__
    else:
        from transformers import PreTrainedModel

        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable, total = PeftModel.get_nb_trainable_parameters(model)
        peft_types = {}
        adapter_model_type = "None"
    layers = get_layer_status(model)

    enabled = {status.enabled for status in layers}
    actives = {tuple(status.active_adapters) for status in layers}
    # merged: every adapter merged somewhere must be merged in every layer that holds it
    merged_anywhere = set().union(*(status.merged_adapters for status in layers))
    merged: list[str] | Irregular = sorted(merged_anywhere)
    if any(merged_anywhere & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
        merged = "irregular"
    requires_grad: dict[str, list[bool | str]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for key, value in status.requires_grad.items():
            requires_grad[key].append(value)
        for key, types in status.devices.items():
            devices[key].update(types)
    backends = {status.quantization_backend for status in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=merged,
        requires_grad={key: _all_or_none(values) for key, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(status.available_adapters for status in layers))),
        devices={key: sorted(types) for key, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
