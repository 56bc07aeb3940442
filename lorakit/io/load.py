"""The keyword arguments of ``PeftModel.from_pretrained`` / ``load_adapter`` (PEFT's), key remapping, and the
check that a file may be reloaded into an existing adapter."""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import torch

#: PEFT reads these for CPU/disk-offload dispatch (accelerate hooks), which lorakit does not implement.
_OFFLOAD_KWARGS = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")

#: Config fields that change what a set of adapter weights computes: a reload into an existing adapter needs them
#: equal (target modules and modules_to_save are checked through the file's keys).
RELOAD_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "bias")


def hub_kwarg_names() -> set[str]:
    """Keyword arguments passed on to ``huggingface_hub.hf_hub_download`` (PEFT's split), plus ``use_auth_token``."""
    from huggingface_hub import hf_hub_download

    return (set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder"}) | {
        "use_auth_token"
    }


def split_load_kwargs(kwargs: dict[str, Any], caller: str) -> dict[str, Any]:
    """The Hub download arguments among ``kwargs`` (``use_auth_token`` becomes ``token``). PEFT's loading options
    lorakit lacks raise ``NotImplementedError`` when switched on; anything else is ignored, as PEFT does, with a
    warning naming it (a misspelt ``is_trainable`` must not pass unseen)."""
    hub_names = hub_kwarg_names()
    hub: dict[str, Any] = {}
    unknown = []
    for key, value in kwargs.items():
        if key in hub_names:
            hub["token" if key == "use_auth_token" else key] = value
        elif key == "ignore_mismatched_sizes":
            if value:
                raise NotImplementedError(f"{caller}(ignore_mismatched_sizes=True) is not implemented in lorakit.")
        elif key == "use_safetensors":
            pass  # PEFT reads it only for disk offload; both file formats are found either way
        elif key in _OFFLOAD_KWARGS:
            if value is not None:
                raise NotImplementedError(
                    f"{caller}({key}=...) (CPU/disk offload dispatch) is not implemented in lorakit."
                )
        else:
            unknown.append(key)
    if unknown:  # PEFT drops them without a word; raising would break PEFT code that runs
        warnings.warn(
            f"{caller}() ignores the keyword arguments {sorted(unknown)} (as PEFT does): besides its named "
            f"parameters it takes huggingface_hub.hf_hub_download's ({', '.join(sorted(hub_names))}). Check the "
            "spelling if one of them was meant.",
            stacklevel=3,
        )
    return hub


def remap_keys(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """PEFT's ``key_mapping``: on each key without its ``base_model.model.`` prefix, the first pattern that matches
    is substituted (``re.subn``); the prefix is put back."""
    if not key_mapping:
        return tensors
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping: the adapter file's key {key!r} does not start with 'base_model.'.")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new, n = re.subn(pattern, replacement, rest)
            if n:
                rest = new
                break
        out[prefix + rest] = value
    return out


def check_reload_compatible(existing: Any, loaded: Any, adapter_name: str) -> None:
    """A file reloaded into the existing adapter ``adapter_name`` must have been made with the same rank, alpha
    and variant; otherwise its weights would compute something else under the existing adapter's settings."""
    differ = [f for f in RELOAD_FIELDS if getattr(existing, f) != getattr(loaded, f)]
    if differ:
        detail = ", ".join(
            f"{f}: {getattr(loaded, f)!r} in the file, {getattr(existing, f)!r} in the model" for f in differ
        )
        raise ValueError(
            f"cannot reload into the existing adapter {adapter_name!r}: its config differs ({detail}). Load it under "
            "a new adapter_name, or delete_adapter() first."
        )
