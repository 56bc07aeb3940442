"""PEFT-format adapter files: the one place that maps lorakit's in-memory parameter names to PEFT's file keys.

In memory (under a ``PeftModel``)              In ``adapter_model.safetensors`` (PEFT's keys)
``base_model.model.<p>.adapters.<name>.lora_A.weight``   ``base_model.model.<p>.lora_A.weight``  (r, in)
``base_model.model.<p>.adapters.<name>.lora_B.weight``   ``base_model.model.<p>.lora_B.weight``  (out, r)
``base_model.model.<p>.adapters.<name>.lora_embedding_A`` ``base_model.model.<p>.lora_embedding_A`` (r, vocab)
``base_model.model.<p>.modules_to_save.<name>.<k>``      ``base_model.model.<p>.<k>``
``base_model.model.<p>.base_layer.bias`` (bias modes)    the same key
``base_model.model.<emb>.base_layer.weight`` (embeddings) the same key (``save_embedding_layers``)

The file drops the adapter name, so an adapter loads under any name.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"

#: PEFT's ``EMBEDDING_LAYER_NAMES``: an adapter targeting one of these saves the embeddings' base weights too
#: (``save_embedding_layers="auto"``).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


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


def embedding_key_map(root: nn.Module, wrapped_only: bool) -> dict[str, str]:
    """{file key: in-memory key} of the base weights of the input and output embeddings of a transformers model
    under ``root`` (empty for other models): ``<emb>.base_layer.<k>`` of a LoRA-wrapped embedding (a plain
    ``nn.Embedding`` / ``nn.Linear`` base only, as PEFT), and unless ``wrapped_only`` also ``<emb>.<k>`` of a plain
    one and ``<emb>.original_module.<k>`` of a modules_to_save copy. File and in-memory keys are the same."""
    from lorakit.layers import LORA_WRAPPERS, ModulesToSaveWrapper

    mapping: dict[str, str] = {}
    for name, layer in _embedding_layers(root):
        if isinstance(layer, LORA_WRAPPERS):
            if not isinstance(layer.base_layer, nn.Linear | nn.Embedding):
                continue
            prefix, inner = f"{name}.base_layer.", layer.base_layer
        elif wrapped_only:
            continue
        elif isinstance(layer, ModulesToSaveWrapper):
            prefix, inner = f"{name}.original_module.", layer.original_module
        else:
            prefix, inner = f"{name}.", layer
        mapping.update({prefix + k: prefix + k for k in inner.state_dict(keep_vars=True)})
    return mapping


def _embedding_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the input and output embeddings of a transformers model under ``root`` (none for
    other models, or for an output layer that is not a submodule)."""
    if not callable(getattr(root, "get_input_embeddings", None)):
        return []
    names = {id(m): n for n, m in root.named_modules()}
    output = root.get_output_embeddings() if callable(getattr(root, "get_output_embeddings", None)) else None
    return [(names[id(m)], m) for m in (root.get_input_embeddings(), output) if m is not None and id(m) in names]


def _embedding_copy_keys(root: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{file key: in-memory key} of ``<emb>.modules_to_save.<k>`` keys in ``tensors``: PEFT, saving the embedding
    layers of a model whose embeddings are in ``modules_to_save``, also writes the adapter's trained copy under
    that key (its copy's key without the adapter name) beside ``<emb>.<k>``, the same tensor; it goes into the
    copy of ``adapter_name``."""
    from lorakit.layers import ModulesToSaveWrapper

    mapping = {}
    for name, layer in _embedding_layers(root):
        if not isinstance(layer, ModulesToSaveWrapper):
            continue
        copy = layer.modules_to_save._modules.get(adapter_name)
        prefix = f"{name}.modules_to_save."
        for k in copy.state_dict(keep_vars=True) if copy is not None else ():
            if prefix + k in tensors:
                mapping[prefix + k] = f"{prefix}{adapter_name}.{k}"
    return mapping


def embedding_is_targeted(root: nn.Module, config: Any) -> bool:
    """PEFT's rule: a regex ``target_modules`` matching a module named ``...embed_tokens`` / ``...lm_head``, or a
    list holding one of those names verbatim."""
    target = config.target_modules
    if isinstance(target, str) and target.lower() != "all-linear":
        base = root.get_base_model() if hasattr(root, "get_base_model") else root
        return any(
            re.fullmatch(target, name)
            for name, _ in base.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)
        )
    return bool(target) and not isinstance(target, str) and any(e in target for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(root: nn.Module, config: Any) -> bool:
    """PEFT's check for ``save_embedding_layers="auto"``: the model's ``vocab_size`` differs from that of the base
    model's ``config.json`` (``base_model_name_or_path``: a local folder, or the Hub unless ``HF_HUB_OFFLINE``; a
    GGUF file: its metadata)."""
    model_config = getattr(root, "config", None)
    vocab_size = getattr(model_config, "vocab_size", None)
    model_id = config.base_model_name_or_path
    if not vocab_size or not model_id:
        return False
    from lorakit.quant.gguf_in import pretrained_args

    try:
        source, gguf = pretrained_args(model_id)  # a GGUF base: its config is in the file's metadata
    except (OSError, ValueError, ImportError):  # a GGUF moved or unreadable since it was loaded: as PEFT, unchanged
        return False
    if gguf:
        return vocab_size != type(model_config).from_pretrained(source, **gguf).vocab_size
    exists = os.path.exists(os.path.join(model_id, "config.json"))
    if not exists and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        from huggingface_hub import file_exists

        try:
            exists = file_exists(model_id, "config.json")
        except Exception as e:  # invalid repo id, no network: PEFT assumes the vocabulary is unchanged
            warnings.warn(
                f"save_embedding_layers='auto': could not read {model_id!r}/config.json ({type(e).__name__}); "
                "assuming the vocabulary was not resized (pass save_embedding_layers=True if it was).",
                stacklevel=3,
            )
            return False
    if not exists:
        return False
    return vocab_size != type(model_config).from_pretrained(model_id).vocab_size


def saved_embedding_keys(root: nn.Module, config: Any, save_embedding_layers: bool | str) -> dict[str, str]:
    """{file key: in-memory key} of the embedding base weights saved beside the adapter (PEFT's
    ``save_embedding_layers``): ``"auto"`` saves them when ``target_modules`` names an embedding layer or the
    vocabulary was resized; True always; False never."""
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r} is invalid; allowed: 'auto', True, False.")
    targeted = embedding_is_targeted(root, config)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted or _vocab_resized(root, config)
        if save_embedding_layers:
            warnings.warn(
                "save_embedding_layers='auto': saving the embedding layers' base weights, as "
                + ("target_modules names an embedding layer." if targeted else "the vocabulary was resized."),
                stacklevel=3,
            )
    if not save_embedding_layers:
        return {}
    if not callable(getattr(root, "get_input_embeddings", None)):
        warnings.warn(
            "save_embedding_layers=True: the model is not a transformers model (no get_input_embeddings), so no "
            "embedding layer is saved.",
            stacklevel=3,
        )
        return {}
    return embedding_key_map(root, wrapped_only=targeted)


def get_adapter_state_dict(
    root: nn.Module,
    adapter_name: str,
    bias: str = "none",
    embedding_keys: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` (and ``embedding_keys``) under PEFT's file keys, detached, contiguous, on
    CPU, in their dtype. ``state_dict`` (a full state dict of ``root``, e.g. gathered under FSDP) replaces
    ``root``'s own tensors when given."""
    state = root.state_dict(keep_vars=True) if state_dict is None else state_dict
    mapping = {**adapter_key_map(root, adapter_name, bias), **(embedding_keys or {})}
    return {fk: state[mk].detach().to("cpu").contiguous().clone() for fk, mk in mapping.items()}


def check_finite(state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """Raise ``DamagedFileError`` (a ``ValueError``) naming the first tensor of ``state`` holding NaN or inf, how
    many do, and ``fix``: such an adapter (a diverged run, or damaged bytes) only ever produces NaN outputs."""
    from lorakit.io.files import DamagedFileError

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise DamagedFileError(
            f"{what} has non-finite weights (NaN or inf) in {bad[0]!r}{more}: it was trained with a learning rate or "
            f"lora_alpha that diverged, or its file is damaged. {fix}"
        )


_LOAD_FIX = "Load an earlier checkpoint of the run, or save or copy the adapter again."


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
    that would run code is refused). A damaged file (truncated, garbage) or one holding NaN / inf raises
    ``DamagedFileError`` (a ``ValueError``) naming the file."""
    from lorakit.io.files import AdapterNotFoundError, DamagedFileError, resolve_file

    file = resolve_file(path, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    if file is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(file, device="cpu")
        except (SafetensorError, OSError) as e:
            raise DamagedFileError(
                f"{file} is damaged or incomplete ({e}): it is not a readable safetensors file. Save or copy the "
                "adapter again."
            ) from e
        check_finite(tensors, file, _LOAD_FIX)
        return tensors
    file = resolve_file(path, WEIGHTS_NAME_BIN, subfolder=subfolder, **hub_kwargs)
    if file is not None:
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError and friends
            raise DamagedFileError(
                f"{file} could not be loaded with torch.load(weights_only=True): it is damaged, or holds more than "
                f"tensors, and lorakit never runs pickled code. ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise DamagedFileError(f"{file} does not hold a dict of tensors; it is not an adapter weights file.")
        check_finite(tensors, file, _LOAD_FIX)
        return tensors
    where = os.path.join(str(path), subfolder or "")
    raise AdapterNotFoundError(
        f"{where!r} is not an adapter folder: it has no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN}."
    )


def _part_suffix() -> re.Pattern:
    """File-key endings that name a part of a LoRA layer rather than a module (``_module_of`` strips them): every
    registered adapter class's tensor suffixes, and base-layer / original-module tensors."""
    from lorakit.adapter import tensor_suffixes

    parts = "|".join(sorted(map(re.escape, tensor_suffixes())))
    return re.compile(rf"\.({parts}|(base_layer|original_module)\.[^.]+)$")


def _module_of(key: str) -> str:
    """The module a file key belongs to: ``m.lora_A.weight``, ``m.base_layer.bias``, ``m.weight`` -> ``m``."""
    key = key.removeprefix("base_model.model.")
    stripped = _part_suffix().sub("", key)
    return stripped if stripped != key else key.rsplit(".", 1)[0]


def _modules_listed(keys: list[str]) -> str:
    """The modules of ``keys`` (sorted keys), at most ten, with the first key as an example."""
    modules = sorted({_module_of(k) for k in keys})
    return f"{modules[:10]}{' ...' if len(modules) > 10 else ''} (e.g. {keys[0]!r})"


def check_and_copy(
    root: nn.Module, adapter_name: str, bias: str, tensors: dict[str, torch.Tensor]
) -> _IncompatibleKeys:
    """Check that ``tensors`` (PEFT file keys) fit the adapter injected as ``adapter_name`` exactly — every key
    present, no extra module, equal shapes — and copy them in. Embedding base weights (PEFT's
    ``save_embedding_layers``) are optional and copied into the base layer. Raises ``ValueError`` naming the
    module and both shapes before anything is copied. Returns torch's ``_IncompatibleKeys`` as
    ``load_state_dict(strict=False)`` (and so PEFT) does: ``missing_keys`` lists every key of ``root`` not written
    (the base model's, other adapters'), ``unexpected_keys`` is empty (an unexpected key raises instead)."""
    mapping = adapter_key_map(root, adapter_name, bias)
    state = root.state_dict(keep_vars=True)
    embeddings = {k: v for k, v in embedding_key_map(root, wrapped_only=False).items() if k in tensors}
    embeddings.update(_embedding_copy_keys(root, adapter_name, tensors))
    mapping.update({k: v for k, v in embeddings.items() if k not in mapping})
    extra = sorted(set(tensors) - set(mapping))
    if extra:
        raise ValueError(
            f"the adapter file has weights for modules this model does not adapt: {_modules_listed(extra)}. Was it "
            "trained on another base model or with other target_modules?"
        )
    missing = sorted(set(mapping) - set(tensors))
    if missing:
        hint = "The file and adapter_config.json do not belong together, or the base model differs."
        if all(".modules_to_save." in mapping[k] for k in missing):
            hint = (
                "Only modules_to_save copies are missing: modules_to_save entries match by name suffix, as in PEFT "
                "(['norm'] takes every '...norm'), and lorakit before 2026-11-25 matched whole name parts. For an "
                "adapter saved then, write the full module names in adapter_config.json's modules_to_save (e.g. "
                "'model.norm')."
            )
        raise ValueError(
            f"the adapter file lacks weights for modules its config targets: {_modules_listed(missing)}. {hint}"
        )
    for fk, mk in mapping.items():
        have, want = tuple(tensors[fk].shape), tuple(state[mk].shape)
        if have != want:
            hint = (
                "The vocabulary was resized for this adapter: call model.resize_token_embeddings(...) first."
                if fk in embeddings
                else "The adapter was made for another base model, or its rank differs from r/rank_pattern in its "
                "adapter_config.json."
            )
            raise ValueError(
                f"shape mismatch for {fk!r} (module {_module_of(fk)!r}): "
                f"the adapter file has {have}, the model expects {want}. {hint}"
            )
    modules = dict(root.named_modules())
    for key in sorted(embeddings):
        owner = modules.get(key.rsplit(".", 1)[0].removesuffix(".base_layer"))
        if getattr(owner, "merged_adapters", None):
            raise ValueError(
                f"the adapter file holds the embedding weight {key!r}, but adapters {owner.merged_adapters} are "
                "merged into that layer; call unmerge_adapter() before loading."
            )
    with torch.no_grad():
        for fk, mk in mapping.items():
            state[mk].copy_(tensors[fk])
    written = set(mapping.values())
    return _IncompatibleKeys(missing_keys=[k for k in state if k not in written], unexpected_keys=[])


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """PEFT's function: the adapter's tensors under PEFT's file keys (what ``save_pretrained`` writes).

    ``state_dict`` (a full state dict of ``model``, e.g. gathered under FSDP/ZeRO-3) replaces ``model``'s own
    tensors when given. ``unwrap_compiled``: ``model`` may be a ``torch.compile``'d PeftModel.
    ``save_embedding_layers`` as in ``PeftModel.save_pretrained``.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = model.peft_config[adapter_name]
    mapping = {
        **adapter_key_map(model, adapter_name, config.bias),
        **saved_embedding_keys(model, config, save_embedding_layers),
    }
    source = state_dict if state_dict is not None else model.state_dict()
    return {fk: source[mk] for fk, mk in mapping.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """PEFT's function: copy tensors keyed as in a PEFT file into the existing adapter ``adapter_name``; returns
    ``_IncompatibleKeys(missing_keys, unexpected_keys)`` as PEFT does (the model's keys not written; none
    unexpected, see below).

    Unlike PEFT, a key or shape that does not fit raises ``ValueError`` naming the module (nothing is copied).
    ``low_cpu_mem_usage`` changes nothing (the adapter's tensors exist already).
    """
    if ignore_mismatched_sizes:
        raise NotImplementedError(
            "set_peft_model_state_dict(ignore_mismatched_sizes=True) is not implemented in lorakit."
        )
    config = model.peft_config[adapter_name]
    return check_and_copy(model, adapter_name, config.bias, peft_model_state_dict)
