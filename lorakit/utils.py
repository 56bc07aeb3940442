"""The names PEFT users import from ``peft.utils`` for LoRA, re-exported from where lorakit defines them.

``from peft.utils import X`` -> ``from lorakit.utils import X``. Each name is the lorakit object itself (not a
copy): ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` is the table ``target_modules=None`` reads.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lorakit.config import CONFIG_NAME, PeftType, TaskType
from lorakit.inject import DEFAULT_TARGET_MODULES as TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from lorakit.io.adapter import WEIGHTS_NAME as SAFETENSORS_WEIGHTS_NAME
from lorakit.io.adapter import WEIGHTS_NAME_BIN as WEIGHTS_NAME
from lorakit.io.adapter import get_peft_model_state_dict, load_adapter_weights, set_peft_model_state_dict
from lorakit.layers import ModulesToSaveWrapper
from lorakit.quant.prepare import prepare_model_for_kbit_training
from lorakit.variants.loftq_replace import replace_lora_weights_loftq

#: PEFT's shorthand for "every linear layer except the output layer" (``target_modules="all-linear"``).
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"

__all__ = [
    "CONFIG_NAME",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "TaskType",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
]


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None, **hf_hub_download_kwargs: Any
                      ) -> dict[str, torch.Tensor]:
    """PEFT's ``load_peft_weights``: the tensors of an adapter folder or Hub repo, PEFT's file keys, on ``device``
    (default CPU). ``subfolder``, ``revision``, ``token``, ... as in PEFT."""
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    tensors = load_adapter_weights(os.fspath(model_id), subfolder=subfolder, **hf_hub_download_kwargs)
    return tensors if device is None else {k: v.to(device) for k, v in tensors.items()}
