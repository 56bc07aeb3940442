"""Mixed-adapter batches: each row of a batch runs its own adapter (``"__base__"``: none).

``PeftModel.forward/generate(..., adapter_names=[...])`` sets the row names on every wrapper for the duration of
the call (``mixed_batch``); the wrappers then gather each row's factors and run batched matmuls instead of
looping over adapters with masked copies (PEFT). With ``n`` adapters of ranks ``r_i`` padded to ``R = max r_i``
(zero rows of A and zero columns of B add nothing) and slot 0 all zeros for ``"__base__"``:

    A_all (n+1, R, in),  B_all (n+1, out, R) = s_i B_i,   idx (batch,) row -> slot
    h = bmm(x, A_all[idx]^T)        (batch, T, R)
    y = result + bmm(h, B_all[idx]^T)                       (batch, T, out)
    (few tokens per row: y = result + ((x A_cat^T) * onehot(idx) per R-block) B_cat^T, no per-row gathers)
    DoRA: y = (result - b + bmm(...)) * g_all[idx] + b,     g_all (n+1, out) = m / ||W + s B A||_c, 1 for LoRA rows

Gathering keeps autograd, so mixed batches train. Per-row dropout uses each adapter's own ``p``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import LORA_WRAPPERS, LoraEmbeddingAdapter, ModulesToSaveWrapper

BASE = "__base__"
#: Below this many (tokens per row x slots), the masked one-GEMM form is used: its extra FLOPs (every row
#: through every slot's A) cost less than gathering a (batch, R, in) copy of the factors.
_FEW_TOKENS = 32


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str], known: list[str]) -> Iterator[None]:
    """Within the block, row ``i`` of every batch uses adapter ``adapter_names[i]`` in every wrapper of ``model``."""
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names has unknown adapters {unknown}; available: {sorted(known)} or {BASE!r}.")
    wrappers = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and set(names) & set(module.modules_to_save):
            raise NotImplementedError("adapter_names= with modules_to_save adapters is not implemented in lorakit.")
        if isinstance(module, LORA_WRAPPERS):
            merged = set(module.merged_adapters)
            if merged:
                raise ValueError(f"adapter_names= needs unmerged adapters; {sorted(merged)} are merged: unmerge first.")
            wrappers.append(module)
    slot_cache: dict = {}  # one call's row -> slot indices, shared by the wrappers (same rows everywhere)
    for module in wrappers:
        module.row_adapters = names
        module.row_slot_cache = slot_cache
    try:
        yield
    finally:
        for module in wrappers:
            module.row_adapters = None
            module.row_slot_cache = None


def _slots(wrapper: nn.Module, batch: int, device: torch.device) -> tuple[list[nn.Module], torch.Tensor]:
    """The adapters present in the batch (slot i+1) and the slot of each row (batch,); slot 0 is "no adapter"."""
    names = wrapper.row_adapters
    if batch != len(names):
        if batch % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch} rows.")
        names = [n for n in names for _ in range(batch // len(names))]  # generate() expands rows in place
    present = tuple(dict.fromkeys(n for n in names if n in wrapper.adapters))
    cache = getattr(wrapper, "row_slot_cache", None)
    key = (present, batch, device)
    idx = cache.get(key) if cache is not None else None
    if idx is None:
        slot = {n: i + 1 for i, n in enumerate(present)}
        idx = torch.tensor([slot.get(n, 0) for n in names], device=device)
        if cache is not None:
            cache[key] = idx
    return [wrapper.adapters[n] for n in present], idx


def _cached_factors(wrapper: nn.Module, adapters: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """``_stack_factors``, reused across calls when no graph is being built (inference, generation): keyed by
    each factor's identity, storage and version counter, so any in-place update (optimizer step, load, merge
    preparation) or replacement rebuilds it. Under autograd the stack is rebuilt every call (it is in the graph)."""
    if torch.is_grad_enabled():
        return _stack_factors(adapters)
    params = [p for ad in adapters for p in _factor_params(ad)]
    key = tuple((id(p), p.data_ptr(), p._version) for p in params) + tuple(float(ad.scaling) for ad in adapters)
    cached = getattr(wrapper, "_mixed_factors", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    a_all, b_all = _stack_factors(adapters)
    wrapper._mixed_factors = (key, a_all, b_all)
    return a_all, b_all


def _factor_params(ad: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ad, LoraEmbeddingAdapter):
        return ad.lora_embedding_A, ad.lora_embedding_B
    return ad.lora_A.weight, ad.lora_B.weight


def _stack_factors(adapters: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_all`` (n+1, R, in) and ``B_all`` (n+1, out, R) with the scaling folded into B; slot 0 zeros."""
    rank = max(ad.r for ad in adapters)
    a_list, b_list = [], []
    for ad in adapters:
        a, b = _factor_params(ad)
        a_list.append(F.pad(a, (0, 0, 0, rank - ad.r)))  # (R, in)
        b_list.append(F.pad(b * ad.scaling, (0, rank - ad.r)))  # (out, R)
    a_all = torch.stack([torch.zeros_like(a_list[0])] + a_list)
    b_all = torch.stack([torch.zeros_like(b_list[0])] + b_list)
    return a_all, b_all


def _magnitudes(wrapper: nn.Module, adapters: list[nn.Module], b_all: torch.Tensor) -> torch.Tensor | None:
    """``g_all`` (n+1, out): DoRA's ``m / ||W + s B A||_c`` per slot, 1 for LoRA slots; None without DoRA."""
    if not any(ad.wraps_base_output for ad in adapters):
        return None
    ones = torch.ones(b_all.shape[1], device=b_all.device, dtype=b_all.dtype)  # (out,)
    rows = [ones] + [
        ad.lora_magnitude_vector / ad.row_norm(wrapper) if ad.wraps_base_output else ones for ad in adapters
    ]
    return torch.stack(rows)


def _dropped(x: torch.Tensor, adapters: list[nn.Module], idx: torch.Tensor, training: bool) -> torch.Tensor:
    """Each row dropped out with its own adapter's ``p`` (batch, T, in)."""
    if not training:
        return x
    out = x
    for slot, ad in enumerate(adapters, start=1):
        if isinstance(ad.dropout, nn.Dropout):
            rows = (idx == slot).view(-1, *([1] * (x.dim() - 1)))
            out = torch.where(rows, ad.dropout(x), out)
    return out


def mixed_linear_forward(wrapper: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (batch, ..., out) plus each row's adapter on ``x`` (batch, ..., in)."""
    adapters, idx = _slots(wrapper, x.shape[0], x.device)
    if not adapters:
        return result
    a_all, b_all = _cached_factors(wrapper, adapters)
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != a_all.dtype:
        x = x.to(a_all.dtype)
    x3 = _dropped(x, adapters, idx, wrapper.training).reshape(x.shape[0], -1, x.shape[-1])  # (batch, T, in)
    slots, rank = a_all.shape[0], a_all.shape[1]
    if x3.shape[1] * slots <= _FEW_TOKENS:  # decode-like: one GEMM over every slot beats per-row gathers
        h = x3 @ a_all.reshape(slots * rank, -1).T  # (batch, T, slots*R)
        keep = F.one_hot(idx, slots).to(h.dtype).repeat_interleave(rank, dim=1)  # (batch, slots*R)
        b_cat = b_all.permute(1, 0, 2).reshape(b_all.shape[1], slots * rank)  # (out, slots*R)
        lora = (h * keep[:, None, :]) @ b_cat.T  # (batch, T, out)
    else:
        h = torch.bmm(x3, a_all[idx].transpose(1, 2))  # (batch, T, R)
        lora = torch.bmm(h, b_all[idx].transpose(1, 2))  # (batch, T, out)
    lora = lora.reshape(result.shape).to(result.dtype)  # (batch, ..., out)
    if any(getattr(ad.lora_B, "bias", None) is not None for ad in adapters):
        zeros = torch.zeros(result.shape[-1], device=x.device, dtype=a_all.dtype)
        biases = torch.stack([zeros] + [ad.lora_B.bias * ad.scaling if ad.lora_B.bias is not None else zeros
                                        for ad in adapters])  # (n+1, out)
        lora = lora + biases[idx].view(x.shape[0], *([1] * (result.dim() - 2)), -1).to(result.dtype)
    g_all = _magnitudes(wrapper, adapters, b_all)
    if g_all is None:
        return result + lora
    g = g_all[idx].view(x.shape[0], *([1] * (result.dim() - 2)), -1).to(result.dtype)  # (batch, 1.., out)
    bias = getattr(wrapper.base_layer, "bias", None)
    if bias is None:
        return (result + lora) * g
    bias = bias.to(result.dtype)
    return (result - bias + lora) * g + bias


def mixed_embedding_forward(wrapper: nn.Module, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (batch, T, dim) plus each row's embedding adapter on ``ids`` (batch, T)."""
    adapters, idx = _slots(wrapper, ids.shape[0], ids.device)
    if not adapters:
        return result
    a_all, b_all = _cached_factors(wrapper, adapters)  # (n+1, R, vocab), (n+1, dim, R)
    ids2 = ids.reshape(ids.shape[0], -1)  # (batch, T)
    h = a_all.transpose(1, 2)[idx[:, None], ids2]  # (batch, T, R)
    lora = torch.bmm(h, b_all[idx].transpose(1, 2)).reshape(result.shape).to(result.dtype)  # (batch, T, dim)
    g_all = _magnitudes(wrapper, adapters, b_all)
    if g_all is None:
        return result + lora
    g = g_all[idx].view(ids.shape[0], *([1] * (result.dim() - 2)), -1).to(result.dtype)
    return (result + lora) * g
