"""PEFT-format adapter files: the one place that maps lorakit's in-memory parameter names to PEFT's file keys.

In memory (under a ``PeftModel``)              In ``adapter_model.safetensors`` (PEFT's keys)
``base_model.model.<p>.adapters.<name>.lora_A.weight``   ``base_model.model.<p>.lora_A.weight``  (r, in)
``base_model.model.<p>.adapters.<name>.lora_B.weight``   ``base_model.model.<p>.lora_B.weight``  (out, r)
``base_model.model.<p>.adapters.<name>.lora_embedding_A`` ``base_model.model.<p>.lora_embedding_A`` (r, vocab)
``base_model.model.<p>.modules_to_save.<name>.<k>``      ``base_model.model.<p>.<k>``
``base_model.model.<p>.base_layer.bias`` (bias modes)    the same key

The file drops the adapter name, so an adapter loads under any name.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"


def file_key(model_key: str, adapter_name: str) -> str | None:
    """PEFT's file key for an in-memory key of adapter ``adapter_name``, or None if the key is not its."""
    marker = f".adapters.{adapter_name}."
    if marker in model_key:
        return model_key.replace(marker, ".", 1)
    marker = f".modules_to_save.{adapter_name}."
    if marker in model_key:
        return model_key.replace(marker, ".", 1)
    return None


def _bias_keys(state: dict[str, torch.Tensor], bias: str) -> list[str]:
    if bias == "all":
        return [
            k
            for k in state
            if k.endswith("bias") and ".adapters." not in k and ".original_module." not in k
            and ".modules_to_save." not in k
        ]
    if bias == "lora_only":
        return [k for k in state if k.endswith(".base_layer.bias")]
    return []


def adapter_key_map(root: nn.Module, adapter_name: str, bias: str) -> dict[str, str]:
    """{file key: in-memory key} of everything saved for ``adapter_name`` (names relative to ``root``)."""
    state = root.state_dict(keep_vars=True)
    mapping: dict[str, str] = {}
    for key in state:
        fk = file_key(key, adapter_name)
        if fk is not None:
            mapping[fk] = key
    for key in _bias_keys(state, bias):
        mapping[key] = key
    return mapping


def get_adapter_state_dict(root: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under PEFT's file keys, detached, contiguous, on CPU, in their dtype."""
    state = root.state_dict(keep_vars=True)
    return {
        fk: state[mk].detach().to("cpu").contiguous().clone()
        for fk, mk in adapter_key_map(root, adapter_name, bias).items()
    }


def save_adapter_weights(state: dict[str, torch.Tensor], folder: str, safe_serialization: bool = True) -> str:
    """Write the tensors as ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) or ``.bin``."""
    if safe_serialization:
        from safetensors.torch import save_file

        path = os.path.join(folder, WEIGHTS_NAME)
        save_file(state, path, metadata={"format": "pt"})
    else:
        path = os.path.join(folder, WEIGHTS_NAME_BIN)
        torch.save(state, path)
    return path


def load_adapter_weights(path: str, subfolder: str | None = None, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors: safetensors, or a ``.bin`` with ``torch.load(weights_only=True)`` (a pickle
    that would run code is refused)."""
    from lorakit.io.files import resolve_file

    file = resolve_file(path, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    if file is not None:
        from safetensors.torch import load_file

        return load_file(file, device="cpu")
    file = resolve_file(path, WEIGHTS_NAME_BIN, subfolder=subfolder, **hub_kwargs)
    if file is not None:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends
            raise ValueError(
                f"{file} could not be loaded with torch.load(weights_only=True): it holds more than tensors, and "
                f"lorakit never runs pickled code. ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from e
    where = os.path.join(str(path), subfolder or "")
    raise FileNotFoundError(f"No {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} in {where!r}.")


def _module_of(key: str) -> str:
    key = re.sub(r"^base_model\.model\.", "", key)
    return key.rsplit(".", 2)[0] if key.endswith((".weight", ".bias")) else key.rsplit(".", 1)[0]


def _modules_listed(keys: list[str]) -> str:
    """The modules of ``keys`` (sorted keys), at most ten, with the first key as an example."""
    modules = sorted({_module_of(k) for k in keys})
    return f"{modules[:10]}{' ...' if len(modules) > 10 else ''} (e.g. {keys[0]!r})"


def check_and_copy(root: nn.Module, adapter_name: str, bias: str, tensors: dict[str, torch.Tensor]) -> None:
    """Check that ``tensors`` (PEFT file keys) fit the adapter injected as ``adapter_name`` exactly — every key
    present, no extra module, equal shapes — and copy them in. Raises ``ValueError`` naming the module and both
    shapes before anything is copied."""
    mapping = adapter_key_map(root, adapter_name, bias)
    state = root.state_dict(keep_vars=True)
    extra = sorted(set(tensors) - set(mapping))
    if extra:
        raise ValueError(
            f"the adapter file has weights for modules this model does not adapt: {_modules_listed(extra)}. Was it "
            "trained on another base model or with other target_modules?"
        )
    missing = sorted(set(mapping) - set(tensors))
    if missing:
        raise ValueError(
            f"the adapter file lacks weights for modules its config targets: {_modules_listed(missing)}. The file "
            "and adapter_config.json do not belong together, or the base model differs."
        )
    for fk, mk in mapping.items():
        have, want = tuple(tensors[fk].shape), tuple(state[mk].shape)
        if have != want:
            raise ValueError(
                f"shape mismatch for {fk!r} (module {_module_of(fk)!r}): "
                f"the adapter file has {have}, the model expects {want}. The adapter was made for another base "
                "model, or its rank differs from r/rank_pattern in its adapter_config.json."
            )
    with torch.no_grad():
        for fk, mk in mapping.items():
            state[mk].copy_(tensors[fk])


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """PEFT's function: the adapter's tensors under PEFT's file keys (what ``save_pretrained`` writes).

    ``state_dict`` (a full state dict of ``model``, e.g. gathered under FSDP/ZeRO-3) replaces ``model``'s own
    tensors when given.
    """
    config = model.peft_config[adapter_name]
    mapping = adapter_key_map(model, adapter_name, config.bias)
    source = state_dict if state_dict is not None else model.state_dict()
    return {fk: source[mk] for fk, mk in mapping.items()}


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """PEFT's function: copy tensors keyed as in a PEFT file into the existing adapter ``adapter_name``.

    Unlike PEFT, a key or shape that does not fit raises ``ValueError`` naming the module (nothing is copied).
    """
    config = model.peft_config[adapter_name]
    check_and_copy(model, adapter_name, config.bias, peft_model_state_dict)
