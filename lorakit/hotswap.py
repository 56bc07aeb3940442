"""Hot-swap an adapter's weights in place, so a compiled model (``torch.compile``) serves a new adapter without
recompiling: tensors keep their identity, shape, dtype and device, and no Python attribute the compiled graph
guards on (the float ``scaling``, the rank) changes.

A saved adapter of rank ``r' <= r`` (the loaded adapter's rank) fits by zero padding: ``A[:r'] = A'``,
``A[r':] = 0``, ``B[:, :r'] = B'``, ``B[:, r':] = 0`` (zero rows/columns add nothing). A different scaling ``s'``
is folded into B: ``s B_stored = s' B'`` with ``B_stored = B' s' / s``. So load the first adapter with the
largest rank you will swap in. Modules the saved adapter does not target get ``A = B = 0`` (they then compute the
base output; a DoRA magnitude is reset to the base weight's norm), as in PEFT. An embedding base weight in the file
(``save_embedding_layers``) must equal the model's: hotswap never changes base weights.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import pattern_value
from lorakit.io.adapter import embedding_key_map, load_adapter_weights
from lorakit.layers import LORA_WRAPPERS, LoraEmbeddingAdapter


def _check_padded(dst: torch.Tensor, src: torch.Tensor, rank_dim: int, what: str) -> None:
    """``src`` fits ``dst`` after zero padding along ``rank_dim`` (-1: no rank dimension, shapes must be equal)."""
    if src.dim() != dst.dim() or any(src.shape[d] != dst.shape[d] for d in range(dst.dim()) if d != rank_dim):
        raise ValueError(f"hotswap: {what} has shape {tuple(src.shape)}, the model's is {tuple(dst.shape)}.")
    if rank_dim >= 0 and src.shape[rank_dim] > dst.shape[rank_dim]:
        raise ValueError(
            f"hotswap: {what} has rank {src.shape[rank_dim]} > the loaded adapter's rank {dst.shape[rank_dim]}; "
            "load the first adapter with the largest rank you will swap in (smaller ranks are zero-padded)."
        )


def _parts(ad: nn.Module, ratio: float) -> list[tuple[str, torch.Tensor, int, float]]:
    """(file-key suffix, parameter, rank dimension or -1, factor) of each tensor of one adapter."""
    if isinstance(ad, LoraEmbeddingAdapter):
        parts = [("lora_embedding_A", ad.lora_embedding_A, 0, 1.0), ("lora_embedding_B", ad.lora_embedding_B, 1, ratio)]
    else:
        parts = [("lora_A.weight", ad.lora_A.weight, 0, 1.0), ("lora_B.weight", ad.lora_B.weight, 1, ratio)]
        if ad.lora_B.bias is not None:
            parts.append(("lora_B.bias", ad.lora_B.bias, -1, ratio))
    if hasattr(ad, "lora_magnitude_vector"):
        parts.append(("lora_magnitude_vector", ad.lora_magnitude_vector, -1, 1.0))
    return parts


@torch.no_grad()
def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default", **kwargs
) -> None:
    """Replace the weights of ``adapter_name`` in ``model`` (a ``PeftModel``, possibly compiled) by those saved in
    ``model_name_or_path``, in place. The saved adapter may target a subset of the adapter's modules (the others
    are zeroed) and have a smaller rank; it may not target modules the adapter lacks. The adapter must not be
    merged. All or nothing: every key and shape is checked before the first tensor changes."""
    peft_model = getattr(model, "_orig_mod", model)  # a torch.compile'd PeftModel
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"hotswap: the model has no adapter {adapter_name!r}; available: {sorted(peft_model.peft_config)}. Load "
            "the first adapter with load_adapter / PeftModel.from_pretrained, then swap others into it."
        )
    config = LoraConfig.from_pretrained(model_name_or_path, **kwargs)
    current = peft_model.peft_config[adapter_name]
    if config.use_dora != current.use_dora:
        raise ValueError(f"hotswap: use_dora={config.use_dora} in the file, {current.use_dora} in the model.")
    wrappers = [
        (name, w)
        for name, w in peft_model.named_modules()
        if isinstance(w, LORA_WRAPPERS) and adapter_name in w.adapters
    ]
    merged = [name for name, w in wrappers if adapter_name in w.merged_adapters]
    if merged:
        raise ValueError(
            f"hotswap: adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]!r}); call "
            "unmerge_adapter() first (unmerging after a swap would subtract the new weights from the base)."
        )
    tensors = load_adapter_weights(os.fspath(model_name_or_path), **kwargs)
    copies: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (parameter, new value, rank dim)
    zeroed: list[tuple[nn.Module, nn.Module]] = []  # (wrapper, adapter) the file does not target
    used: set[str] = set()
    for name, wrapper in wrappers:
        ad = wrapper.adapters[adapter_name]
        module_name = name.removeprefix("base_model.model.")
        r = int(pattern_value(config.rank_pattern, module_name, config.r))
        ratio = config.scaling_for(r, pattern_value(config.alpha_pattern, module_name, config.lora_alpha)) / ad.scaling
        parts = _parts(ad, ratio)
        present = [f"{name}.{suffix}" in tensors for suffix, *_ in parts]
        if not any(present):
            zeroed.append((wrapper, ad))
            continue
        if not all(present):
            lacking = [f"{name}.{suffix}" for (suffix, *_), p in zip(parts, present, strict=True) if not p]
            raise ValueError(f"hotswap: the adapter file has some tensors of {name!r} but not {lacking}.")
        for suffix, dst, rank_dim, factor in parts:
            key = f"{name}.{suffix}"
            src = tensors[key]
            _check_padded(dst, src, rank_dim, key)
            copies.append((dst, src.to(dst.device, dst.dtype) * factor, rank_dim))
            used.add(key)
    state = peft_model.state_dict()
    for key in sorted(set(embedding_key_map(peft_model, wrapped_only=False)) & (set(tensors) - used)):
        # save_embedding_layers' copy of the base weight: not an adapter weight; it must be what the model has
        if not torch.equal(tensors[key].to(state[key]), state[key]):
            raise ValueError(
                f"hotswap: the adapter file's embedding base weight {key!r} differs from the model's (a resized or "
                "retrained vocabulary?); hotswap swaps adapter weights only: load this adapter with "
                "PeftModel.from_pretrained or load_adapter instead."
            )
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"hotswap: the adapter file has weights the model's adapter lacks, e.g. {extra[:3]}.")
    # Everything fits: now change the tensors.
    for dst, src, rank_dim in copies:
        if rank_dim < 0:
            dst.copy_(src)
        else:
            dst.zero_()
            dst.narrow(rank_dim, 0, src.shape[rank_dim]).copy_(src)
    for wrapper, ad in zeroed:
        for suffix, dst, _rank_dim, _factor in _parts(ad, 1.0):
            if suffix != "lora_magnitude_vector":
                dst.zero_()
        if hasattr(ad, "init_magnitude"):  # DoRA: m = ||W|| makes the module compute the base output
            ad.init_magnitude(wrapper)
