"""Hot-swap an adapter's weights in place, so a compiled model (``torch.compile``) serves a new adapter without
recompiling: tensors keep their identity, shape, dtype and device, and no Python attribute the compiled graph
guards on (the float ``scaling``, the rank) changes.

A saved adapter of rank ``r' <= r`` (the loaded adapter's rank) fits by zero padding: ``A[:r'] = A'``,
``A[r':] = 0``, ``B[:, :r'] = B'``, ``B[:, r':] = 0`` (zero rows/columns add nothing). A different scaling ``s'``
is folded into B: ``s B_stored = s' B'`` with ``B_stored = B' s' / s``. So load the first adapter with the
largest rank you will swap in.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import pattern_value
from lorakit.io.adapter import load_adapter_weights
from lorakit.layers import LORA_WRAPPERS, LoraEmbeddingAdapter


def _copy_padded(dst: torch.Tensor, src: torch.Tensor, rank_dim: int, what: str) -> None:
    """Copy ``src`` into ``dst`` along the rank dimension, zero-filling the rest; other dims must agree."""
    if src.dim() != dst.dim() or any(src.shape[d] != dst.shape[d] for d in range(dst.dim()) if d != rank_dim):
        raise ValueError(f"hotswap: {what} has shape {tuple(src.shape)}, the model's is {tuple(dst.shape)}.")
    if src.shape[rank_dim] > dst.shape[rank_dim]:
        raise ValueError(
            f"hotswap: {what} has rank {src.shape[rank_dim]} > the loaded adapter's rank {dst.shape[rank_dim]}; "
            "load the first adapter with the largest rank you will swap in (smaller ranks are zero-padded)."
        )
    dst.zero_()
    dst.narrow(rank_dim, 0, src.shape[rank_dim]).copy_(src)


@torch.no_grad()
def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default", **kwargs
) -> None:
    """Replace the weights of ``adapter_name`` in ``model`` (a ``PeftModel``, possibly compiled) by those saved in
    ``model_name_or_path``, in place. The saved adapter must target the same modules; its rank may be smaller."""
    peft_model = getattr(model, "_orig_mod", model)  # a torch.compile'd PeftModel
    config = LoraConfig.from_pretrained(model_name_or_path, **kwargs)
    current = peft_model.peft_config[adapter_name]
    if config.use_dora != current.use_dora:
        raise ValueError(f"hotswap: use_dora={config.use_dora} in the file, {current.use_dora} in the model.")
    tensors = load_adapter_weights(os.fspath(model_name_or_path), **kwargs)
    used: set[str] = set()
    for name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, LORA_WRAPPERS) or adapter_name not in wrapper.adapters:
            continue
        ad = wrapper.adapters[adapter_name]
        module_name = name.removeprefix("base_model.model.")
        r = int(pattern_value(config.rank_pattern, module_name, config.r))
        ratio = config.scaling_for(r, pattern_value(config.alpha_pattern, module_name, config.lora_alpha)) / ad.scaling
        if isinstance(ad, LoraEmbeddingAdapter):
            pairs = [
                ("lora_embedding_A", ad.lora_embedding_A, 0, 1.0),
                ("lora_embedding_B", ad.lora_embedding_B, 1, ratio),
            ]
        else:
            pairs = [("lora_A.weight", ad.lora_A.weight, 0, 1.0), ("lora_B.weight", ad.lora_B.weight, 1, ratio)]
            if ad.lora_B.bias is not None:
                pairs.append(("lora_B.bias", ad.lora_B.bias, -1, ratio))
        if hasattr(ad, "lora_magnitude_vector"):
            pairs.append(("lora_magnitude_vector", ad.lora_magnitude_vector, -1, 1.0))
        for suffix, dst, rank_dim, factor in pairs:
            key = f"{name}.{suffix}"
            if key not in tensors:
                raise ValueError(f"hotswap: the adapter file has no {key!r}; it targets other modules.")
            src = tensors[key].to(dst.device, dst.dtype) * factor
            if rank_dim < 0:
                if src.shape != dst.shape:
                    raise ValueError(f"hotswap: {key} has shape {tuple(src.shape)}, the model's is {tuple(dst.shape)}.")
                dst.copy_(src)
            else:
                _copy_padded(dst, src, rank_dim, key)
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"hotswap: the adapter file has weights the model's adapter lacks, e.g. {extra[:3]}.")
