"""Hot-swap an adapter's weights in place, so a compiled model (``torch.compile``) serves a new adapter without
recompiling: tensors keep their identity, shape, dtype and device, and no Python attribute the compiled graph
guards on (the float ``scaling``, the rank) changes.

A saved adapter of rank ``r' <= r`` (the loaded adapter's rank) fits by zero padding: ``A[:r'] = A'``,
``A[r':] = 0``, ``B[:, :r'] = B'``, ``B[:, r':] = 0`` (zero rows/columns add nothing). A different scaling ``s'``
is folded into B: ``s B_stored = s' B'`` with ``B_stored = B' s' / s``. A larger rank changes the factors'
shapes, which a compiled graph would recompile for: on a compiled model it is refused, so either load the first
adapter with the largest rank you will swap in or pad it first with ``prepare_model_for_compiled_hotswap``
(before compiling). On a model that is not compiled, a larger rank grows the factors (new zero-padded
parameters), as PEFT allows. Modules the saved adapter does not target get ``A = B = 0`` (they then compute the
base output; a DoRA magnitude is reset to the base weight's norm), as in PEFT. An embedding base weight in the file
(``save_embedding_layers``) must equal the model's: hotswap never changes base weights.

Where a module's rank grows, its scaling ``s`` is kept, and the adapter's config records the new rank with the
alpha that gives the same ``s`` (``alpha = s r'``, or ``s sqrt(r')`` with rsLoRA), so that a ``save_pretrained``
after the swap writes a folder that loads back (in lorakit or PEFT) to the same outputs.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Literal

import torch
from torch import nn

from lorakit.config import LoraConfig, pattern_value
from lorakit.io.adapter import embedding_key_map, load_adapter_weights
from lorakit.layers import LORA_WRAPPERS


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'d: an ``OptimizedModule`` wrapper, or it or a submodule compiled in
    place with ``nn.Module.compile()``."""
    return hasattr(model, "_orig_mod") or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )


def _check_padded(dst: torch.Tensor, src: torch.Tensor, rank_dim: int, what: str, compiled: bool) -> None:
    """``src`` fits ``dst`` after zero padding along ``rank_dim`` (-1: no rank dimension, shapes must be equal);
    on a model that is not ``compiled``, a larger rank is allowed too (the factors then grow)."""
    if src.dim() != dst.dim() or any(src.shape[d] != dst.shape[d] for d in range(dst.dim()) if d != rank_dim):
        raise ValueError(f"hotswap: {what} has shape {tuple(src.shape)}, the model's is {tuple(dst.shape)}.")
    if compiled and rank_dim >= 0 and src.shape[rank_dim] > dst.shape[rank_dim]:
        raise ValueError(
            f"hotswap: {what} has rank {src.shape[rank_dim]} > the loaded adapter's rank {dst.shape[rank_dim]}, and "
            "the model is compiled: a larger rank changes the tensors' shapes and would recompile. Before "
            "compiling, call prepare_model_for_compiled_hotswap(model, target_rank=<the largest rank you will swap "
            "in>), or load the first adapter with that rank (smaller ranks are zero-padded)."
        )


def _grow_rank(ad: nn.Module, rank: int, use_rslora: bool) -> bool:
    """Zero-pad the factors of ``ad`` to ``rank`` (new parameters, same ``requires_grad``) where they are smaller;
    returns whether anything grew. ``scaling`` is kept: ``ad.lora_alpha`` becomes ``alpha rank / r`` (``alpha
    sqrt(rank / r)`` with rsLoRA), and ``ad.r`` the new rank."""
    if ad.r >= rank:
        return False
    for suffix, old, rank_dim, _factor in _parts(ad, 1.0):
        if rank_dim < 0:
            continue
        shape = list(old.shape)
        shape[rank_dim] = rank
        new = old.new_zeros(shape)
        new.narrow(rank_dim, 0, old.shape[rank_dim]).copy_(old)
        owner_path, _, attr = suffix.rpartition(".")
        owner = ad.get_submodule(owner_path) if owner_path else ad
        setattr(owner, attr, type(old)(new, requires_grad=old.requires_grad))  # AdapterParameter stays one
    for sub in ad.children():  # the factors' nn.Linear holders (linear adapters) record the new rank
        if isinstance(sub, nn.Linear):
            sub.out_features, sub.in_features = sub.weight.shape
    ad.lora_alpha = ad.lora_alpha * (math.sqrt(rank / ad.r) if use_rslora else rank / ad.r)
    ad.r = rank
    return True


def _record_ranks(config: LoraConfig, adapters: dict[str, nn.Module], grown: set[str]) -> None:
    """Write the ranks of the ``grown`` modules into ``config`` (``adapters``: module name -> adapter, all of the
    adapter's modules): as ``r`` / ``lora_alpha`` when every module now has one rank and one alpha, else as
    ``rank_pattern`` / ``alpha_pattern`` entries for those modules, put first (PEFT takes the first key that
    matches)."""
    if not grown:
        return
    ranks = {ad.r for ad in adapters.values()}
    alphas = {ad.lora_alpha for ad in adapters.values()}
    if len(ranks) == 1 and len(alphas) == 1:
        config.r, config.lora_alpha = ranks.pop(), alphas.pop()
        config.rank_pattern, config.alpha_pattern = {}, {}
        return
    rank_pattern = {name: adapters[name].r for name in sorted(grown)}
    alpha_pattern = {name: adapters[name].lora_alpha for name in sorted(grown)}
    config.rank_pattern = rank_pattern | {k: v for k, v in config.rank_pattern.items() if k not in rank_pattern}
    config.alpha_pattern = alpha_pattern | {k: v for k, v in config.alpha_pattern.items() if k not in alpha_pattern}


def _parts(ad: nn.Module, ratio: float) -> list[tuple[str, torch.Tensor, int, float]]:
    """(file-key suffix, parameter, rank dimension or -1, factor) of each tensor of one adapter: ``B`` and its
    bias (the tensors ``scaling`` multiplies) take ``ratio``."""
    b = ad.factors()[1]
    return [
        (suffix, p, dim, ratio if p is b or suffix.endswith("B.bias") else 1.0)
        for suffix, p, dim in ad.named_tensors()
    ]


@torch.no_grad()
def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default", **kwargs
) -> None:
    """Replace the weights of ``adapter_name`` in ``model`` (a ``PeftModel``, possibly compiled) by those saved in
    ``model_name_or_path``, in place. The saved adapter may target a subset of the adapter's modules (the others
    are zeroed) and have a smaller rank, or a larger one where the model is not compiled (module docstring); it
    may not target modules the adapter lacks. The adapter must not be merged. All or nothing: every key and shape
    is checked before the first tensor changes."""
    peft_model = getattr(model, "_orig_mod", model)  # a torch.compile'd PeftModel
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"hotswap: the model has no adapter {adapter_name!r}; available: {sorted(peft_model.peft_config)}. Load "
            "the first adapter with load_adapter / PeftModel.from_pretrained, then swap others into it."
        )
    config = LoraConfig.from_pretrained(model_name_or_path, **kwargs)
    current = peft_model.peft_config[adapter_name]
    if config.variant != current.variant:
        raise ValueError(
            f"hotswap: use_dora={config.use_dora} in the file, {current.use_dora} in the model (variant "
            f"{config.variant!r} vs {current.variant!r})."
        )
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
    compiled = is_compiled(model)
    copies: list[tuple[nn.Module, str, torch.Tensor, int]] = []  # (adapter, file-key suffix, new value, rank dim)
    grow: dict[str, tuple[nn.Module, int]] = {}  # module name -> (adapter, larger rank), uncompiled models only
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
            _check_padded(dst, src, rank_dim, key, compiled)
            copies.append((ad, suffix, src.to(dst.device, dst.dtype) * factor, rank_dim))
            used.add(key)
            if rank_dim >= 0 and src.shape[rank_dim] > ad.r:
                grow[module_name] = (ad, src.shape[rank_dim])
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
    for ad, rank in grow.values():
        _grow_rank(ad, rank, current.use_rslora)
    _record_ranks(
        current, {n.removeprefix("base_model.model."): w.adapters[adapter_name] for n, w in wrappers}, set(grow)
    )
    for ad, suffix, src, rank_dim in copies:
        dst = next(param for key, param, *_ in _parts(ad, 1.0) if key == suffix)
        if rank_dim < 0:
            dst.copy_(src)
        else:
            dst.zero_()
            dst.narrow(rank_dim, 0, src.shape[rank_dim]).copy_(src)
    for wrapper, ad in zeroed:
        for dst in ad.factors():
            dst.zero_()
        bias = dict((s, p) for s, p, _ in ad.named_tensors()).get("lora_B.bias")
        if bias is not None:
            bias.zero_()
        ad.after_init(wrapper)  # e.g. DoRA: m = ||W|| makes the module compute the base output


@torch.no_grad()
def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """PEFT's ``prepare_model_for_compiled_hotswap``: zero-pad every LoRA adapter of ``model`` (a ``PeftModel``,
    after loading the first adapter and before ``torch.compile``) to ``target_rank``, the largest rank you will
    hot-swap in, so that later swaps of ranks up to it change no tensor shape and do not recompile. Outputs are
    unchanged (zero rows of A and columns of B add nothing) and each adapter's config records the new rank with
    the alpha that keeps its scaling (module docstring). Scalings need no conversion here: ``hotswap_adapter``
    folds a different scaling into B. ``config``: configs (one or a dict) whose ``r`` and ``rank_pattern`` values
    are set to ``target_rank``, as PEFT does. ``check_compiled``: what to do if ``model`` is compiled already
    ("error", "warn" or "ignore")."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled={check_compiled!r} is invalid; allowed: 'error', 'warn', 'ignore'.")
    if is_compiled(model):
        msg = "prepare_model_for_compiled_hotswap: call it before compiling the model (it changes tensor shapes)."
        if check_compiled == "error":
            raise ValueError(msg)
        if check_compiled == "warn":
            warnings.warn(msg + " The compiled model will recompile.", UserWarning, stacklevel=2)
    if target_rank is not None and (
        isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1
    ):
        raise ValueError(f"target_rank={target_rank!r} is invalid: it must be a positive integer.")
    peft_model = getattr(model, "_orig_mod", model)
    per_adapter: dict[str, dict[str, nn.Module]] = {}
    for name, wrapper in peft_model.named_modules():
        if isinstance(wrapper, LORA_WRAPPERS):
            for adapter_name, ad in wrapper.adapters.items():
                per_adapter.setdefault(adapter_name, {})[name.removeprefix("base_model.model.")] = ad
    if not per_adapter:
        raise ValueError(
            "prepare_model_for_compiled_hotswap: the model has no LoRA layers; call it after loading the first "
            "adapter (PeftModel.from_pretrained) and before compiling."
        )
    if target_rank is None:
        return
    too_large = [(n, ad.r) for adapters in per_adapter.values() for n, ad in adapters.items() if ad.r > target_rank]
    if too_large:
        raise ValueError(
            f"prepare_model_for_compiled_hotswap: target_rank={target_rank} is below the rank {too_large[0][1]} of "
            f"{too_large[0][0]!r}; pass the largest rank among all adapters you will swap in."
        )
    if config:
        for cfg in config.values() if isinstance(config, dict) else [config]:
            cfg.r = target_rank
            cfg.rank_pattern = dict.fromkeys(cfg.rank_pattern, target_rank)
    for adapter_name, adapters in per_adapter.items():
        own = peft_model.peft_config[adapter_name]
        grown = {n for n, ad in adapters.items() if _grow_rank(ad, target_rank, own.use_rslora)}
        _record_ranks(own, adapters, grown)
