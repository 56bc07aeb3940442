"""Mixed-adapter batches: each row of a batch runs its own adapter (``"__base__"``: none).

``PeftModel.forward/generate(..., adapter_names=[...])`` sets the row names on every wrapper for the duration of
the call (``mixed_batch``); the wrappers then gather each row's factors and run batched matmuls instead of
looping over adapters with masked copies (PEFT). With ``n`` adapters of ranks ``r_i`` padded to ``R = max r_i``
(zero rows of A and zero columns of B add nothing) and slot 0 all zeros for ``"__base__"``:

    A_all (n+1, R, in),  B_all (n+1, out, R) = s_i B_i,   idx (batch,) row -> slot   (kept transposed, contiguous)
    h = bmm(x, A_all[idx]^T)        (batch, T, R)
    y = result + bmm(h, B_all[idx]^T)                       (batch, T, out)
    few tokens per row (decode) and n G <= 2 batch, no copies of the factors: rows grouped by slot, each group
    padded to the largest, G (gather (n G,), dest (n G,): row of each position; pad outputs zeroed),
        x_g = x[gather].view(n, G T, in)
        y = result.index_add(0, dest, bmm(bmm(x_g, A_all[1:]^T), B_all[1:]^T))     (n, G T, R) -> (n G, T, out)
    DoRA: y = (result - b + bmm(...)) * g_all[idx] + b,     g_all (n+1, out) = m / ||W + s B A||_c, 1 for LoRA rows

modules_to_save: row ``i`` goes through adapter ``adapter_names[i]``'s copy of the module, or the original module
("__base__", adapters without a copy); each module runs once on its own rows.

Gathering keeps autograd, so mixed batches train. Per-row dropout uses each adapter's own ``p``.

Per-call cost matters at decode (one token per row), where the matmuls are tiny: the stacked factors are kept
across calls under ``no_grad`` (keyed by each factor's identity, storage and version counter, so an optimizer step,
``load_adapter``, a hotswap or a replaced tensor rebuilds them), row -> slot indices and row groups are kept while the
row names stay the same, and within one call (``generate``'s steps) each wrapper resolves its plan once. Once the
same row names come in two calls in a row, the model keeps that call's plans for the next calls with those names,
reused after a single check of the whole model (same wrappers, and for the call's names the same adapters, module
copies, submodules, scalings, and factors by identity, storage and version: ``_unchanged``): in bench_variants'
decode step, checking each layer's factors on every call cost ~10% of the forward. An in-place
update through ``.data`` (``p.data.mul_()``, ``p.data.copy_()``) is not seen: ``.data`` has its own version counter,
so the stacked factors go stale; update the parameter itself under ``torch.no_grad()`` (``p.mul_()``,
``p.copy_()``, as optimizers do) or assign a new tensor. :func:`clear_mixed_caches` drops a wrapper's caches.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import LORA_WRAPPERS, LoraEmbeddingAdapter, ModulesToSaveWrapper

BASE = "__base__"
#: Up to this many tokens per row, rows are grouped by adapter (copies of x, batch T in) rather than the factors
#: gathered per row (batch R (in + out)). bench_variants' layers, 32 rows over 8 adapters, r=16, in 256 and 688, one
#: layer timed alone: grouping took 0.13-0.28x the gathered form's time at 1 and 4 tokens. At 64 tokens it took
#: 0.67-0.92x alone, but the whole model's time did not move (bench_mixed, 2 runs), so long rows keep the form
#: that does not pad.
_GROUPED_TOKENS = 4
#: ... and while the groups, each padded to the largest, hold at most this many positions per row of the batch
#: (n*G <= 2 batch). The bench case above has no padding (n*G = batch); a skewed batch pads without bound (25 rows
#: on one adapter and 7 on one each: n*G = 8*25 = 200 for 32 rows), and there the gathered form, which does not
#: pad, wins. At 2 the grouped form does at most twice the unpadded case's work, which took 0.13-0.28x the gathered
#: form's time; that its time grows about linearly in its rows is assumed here, not measured.
_GROUPED_PADDING = 2
_WRAPPERS = (*LORA_WRAPPERS, ModulesToSaveWrapper)


class RowAdapters(list):
    """One call's per-row adapter names, as the wrappers see them in ``row_adapters``, with the call's memo
    (each wrapper's resolved plan, row -> slot indices shared by wrappers with the same adapters). Kept on the model
    for the next call with the same names while nothing the plans depend on changed (``_call_rows``)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.key = tuple(names)
        self.unique = tuple(dict.fromkeys(names))
        self.memo: dict[Any, Any] = {}

    def for_batch(self, batch: int) -> tuple[str, ...]:
        """The names of a batch of ``batch`` rows: ``generate`` repeats each row in place (beams, samples)."""
        if batch == len(self.key):
            return self.key
        if batch % len(self.key):
            raise ValueError(
                f"adapter_names has {len(self.key)} entries for a batch of {batch} rows: pass one name per row."
            )
        return tuple(n for n in self.key for _ in range(batch // len(self.key)))


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """Every LoRA and modules_to_save wrapper in ``model``. Does not walk a LoRA wrapper's own adapters: with many
    adapters they are most of the model's submodules, and ``model.modules()`` made every call pay for them."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, _WRAPPERS):
            found.append(module)
            if isinstance(module, LORA_WRAPPERS):
                continue
        stack.extend(m for m in module._modules.values() if m is not None)
    return found


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str], known: list[str]) -> Iterator[None]:
    """Within the block, row ``i`` of every batch uses adapter ``adapter_names[i]`` in every wrapper of ``model``."""
    wrappers = _wrappers(model)
    rows = _call_rows(model, adapter_names, wrappers)
    unknown = sorted(n for n in rows.unique if n != BASE and n not in known)
    if unknown:
        raise ValueError(f"adapter_names has unknown adapters {unknown}; available: {sorted(known)} or {BASE!r}.")
    for module in wrappers:
        if isinstance(module, LORA_WRAPPERS) and module.merged_adapters:
            merged = sorted(module.merged_adapters)
            raise ValueError(f"adapter_names= needs unmerged adapters; {merged} are merged: unmerge first.")
    # ``row_adapters`` is a plain attribute (set in each wrapper's __init__): written straight into ``__dict__``,
    # skipping ``nn.Module.__setattr__``'s registration checks, twice per wrapper on every decode step.
    for module in wrappers:
        module.__dict__["row_adapters"] = rows
    replayed: list[tuple[nn.Module, Any]] = []
    try:
        if torch.is_grad_enabled():
            replayed = _replay_rows_in_checkpoints(model, rows, wrappers)
        yield
    finally:
        for module in wrappers:
            module.__dict__["row_adapters"] = None
        for module, func in replayed:
            module.__dict__["_gradient_checkpointing_func"] = func


def _with_rows(fn: Any, rows: RowAdapters, wrappers: list[nn.Module]) -> Any:
    """``fn`` run with ``rows`` set on ``wrappers`` (and what they held before put back after)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        held = [w.__dict__["row_adapters"] for w in wrappers]
        for w in wrappers:
            w.__dict__["row_adapters"] = rows
        try:
            return fn(*args, **kwargs)
        finally:
            for w, r in zip(wrappers, held, strict=True):
                w.__dict__["row_adapters"] = r

    return run


def _replay_rows_in_checkpoints(
    model: nn.Module, rows: RowAdapters, wrappers: list[nn.Module]
) -> list[tuple[nn.Module, Any]]:
    """Gradient checkpointing recomputes a layer in the backward pass, after the call (and ``mixed_batch``) has
    ended: without its rows the recompute would run the active adapter on every row (non-reentrant checkpoints
    then fail on the different saved tensors; reentrant ones give wrong gradients). For the call, every module of
    ``model`` that transformers gave a checkpointing function (``_gradient_checkpointing_func``, the one hook
    transformers' layers call to checkpoint, set per instance by ``gradient_checkpointing_enable``) gets one
    that checkpoints the layer with this call's rows set, so the recompute sees them too. Returns the modules
    and their own functions, put back when the call ends. A ``torch.utils.checkpoint`` called directly around LoRA
    layers (not through transformers) is not covered."""
    replayed = []
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is None or not getattr(module, "gradient_checkpointing", False):
            continue

        def checkpointed(fn: Any, *args: Any, _func: Any = func, **kwargs: Any) -> Any:
            return _func(_with_rows(fn, rows, wrappers), *args, **kwargs)

        replayed.append((module, func))
        module.__dict__["_gradient_checkpointing_func"] = checkpointed
    return replayed


# ---- the last call's rows, kept on the model while nothing they depend on changed -------------------------------
#: Bumped by ``clear_mixed_caches``: every model's kept call is then dropped at its next mixed call.
_generation = 0


class _CallCache(NamedTuple):
    """A model's last mixed call: its rows (whose memo holds every wrapper's plan, stacked factors included) and,
    once the same names came twice in a row, what those plans were built from (``watch``), so that further calls
    with these names reuse the plans after one check of the whole model (C-level maps over flat lists) instead
    of a check per layer. Calls whose names keep changing never pay for the snapshot."""

    generation: int
    rows: RowAdapters
    wrappers: list[nn.Module]
    watch: _Watch | None


def _snapshot(rows: RowAdapters, wrappers: list[nn.Module]) -> _Watch:
    """What ``rows``' plans depend on: each wrapper's adapter dict and, for the call's names, the adapter (or copy,
    or original module) each wrapper would run, and those adapters' submodules, factors and scalings."""
    slots: list[tuple[dict, Any]] = []
    adapters: list[nn.Module] = []
    for w in wrappers:
        if isinstance(w, LORA_WRAPPERS):
            own = w._modules["adapters"]._modules
            slots.append((w._modules, "adapters"))
            for name in rows.unique:
                slots.append((own, name))
                if name in own:
                    adapters.append(own[name])
        else:
            copies = w._modules["modules_to_save"]._modules
            slots += [(w._modules, "modules_to_save"), (w._modules, "original_module")]
            slots += [(copies, name) for name in rows.unique]
    return _watch(slots, adapters)


def _call_rows(model: nn.Module, adapter_names: list[str], wrappers: list[nn.Module]) -> RowAdapters:
    """This call's rows: the last call's (with its plans) if the names are the same, the wrappers are, and nothing
    in the snapshot changed; else new ones, remembered on ``model`` for the next call (with a snapshot when the
    names are the last call's)."""
    if torch._C._are_functorch_transforms_active():  # wrapped tensors: no storage to snapshot; nothing kept
        return RowAdapters(adapter_names)
    names = tuple(adapter_names)
    cached: _CallCache | None = model.__dict__.get("_mixed_call")
    repeat = cached is not None and cached.rows.key == names
    if repeat and cached.watch is not None and cached.generation == _generation and cached.wrappers == wrappers:
        if _unchanged(cached.watch):
            return cached.rows
    rows = RowAdapters(adapter_names)
    watch = _snapshot(rows, wrappers) if repeat else None  # taken before any plan of these rows is built
    model.__dict__["_mixed_call"] = _CallCache(_generation, rows, wrappers, watch)
    return rows


# ---- plans: which adapters run, row -> slot, stacked factors -------------------------------------------------
class _Slots:
    """Row -> slot indices for one tuple of present adapters (slot 0: no adapter), and the grouped form's rows:
    ``gather`` (n*G,) the rows of slots 1..n, each group padded to the largest, G, with row 0; ``dest`` (n*G,)
    the row each position adds to; ``pads`` the padded positions (their outputs are zeroed), None without any.
    ``grouped``: whether the padding is small enough for the grouped form (``_GROUPED_PADDING``); without it
    ``gather``, ``dest`` and ``pads`` are None."""

    def __init__(self, names: tuple[str, ...], present: tuple[str, ...], device: torch.device) -> None:
        with torch.inference_mode(False):  # kept across calls: a later call with gradients may save them
            self._build(names, present, device)

    def _build(self, names: tuple[str, ...], present: tuple[str, ...], device: torch.device) -> None:
        slot = {n: i + 1 for i, n in enumerate(present)}
        ids = [slot.get(n, 0) for n in names]
        self.idx = torch.tensor(ids, device=device)  # (batch,)
        groups = [[row for row, s in enumerate(ids) if s == k] for k in range(1, len(present) + 1)]
        self.group = max(map(len, groups))
        self.rows = len(groups) * self.group  # n*G
        self.grouped = self.rows <= _GROUPED_PADDING * len(ids)
        self.gather = self.dest = self.pads = None
        if self.grouped:
            positions = [g[i] if i < len(g) else -1 for g in groups for i in range(self.group)]  # -1: a pad
            pads = [k for k, row in enumerate(positions) if row < 0]
            self.gather = self.dest = torch.tensor([max(row, 0) for row in positions], device=device)  # (n*G,)
            self.pads = torch.tensor(pads, device=device) if pads else None


class _Factors(NamedTuple):
    """The present adapters' factors, stacked with slot 0 all zeros and the scaling folded into B."""

    a_t: torch.Tensor  # (S, in, R): A_all^T, contiguous (row gathers read whole R-vectors)
    b_t: torch.Tensor  # (S, R, out): B_all^T, contiguous
    bias_all: torch.Tensor | None  # (S, out): s_i * lora_B.bias (lora_bias), None if no adapter has one
    dora: bool  # any adapter rescales the base output


class _Plan(NamedTuple):
    adapters: list[nn.Module]  # slot i+1 holds adapters[i]
    slots: _Slots
    factors: _Factors | None  # None under autograd: stacked again every call (it is in the graph)


def _adapter_slots(ad: nn.Module) -> list[tuple[dict, str]]:
    """Where ``ad``'s factors live: (the owning module's ``_parameters``, key) for A, B and, on a linear, B's bias
    (the slot may hold None). Read through ``_modules``/``_parameters``: ``nn.Module.__getattr__`` costs ~1 us a
    lookup, and this runs for every adapter of every layer on every decode step."""
    if isinstance(ad, LoraEmbeddingAdapter):
        return [(ad._parameters, "lora_embedding_A"), (ad._parameters, "lora_embedding_B")]
    lora_b = ad._modules["lora_B"]._parameters
    return [(ad._modules["lora_A"]._parameters, "weight"), (lora_b, "weight"), (lora_b, "bias")]


def _factor_params(ad: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """(A, B) of an embedding adapter, (A, B, B's bias or None) of a linear one."""
    return tuple(d.get(k) for d, k in _adapter_slots(ad))


def _stack_factors(adapters: list[nn.Module]) -> _Factors:
    rank = max(ad.r for ad in adapters)
    a_list, b_list, biases = [], [], []
    for ad in adapters:
        a, b, *bias = _factor_params(ad)
        a_list.append(F.pad(a, (0, 0, 0, rank - ad.r)))  # (R, in)
        b_list.append(F.pad(b * ad.scaling, (0, rank - ad.r)))  # (out, R)
        biases.append(bias[0] * ad.scaling if bias and bias[0] is not None else None)
    a_t = torch.stack([torch.zeros_like(a_list[0])] + a_list).transpose(1, 2).contiguous()  # (S, in, R)
    b_t = torch.stack([torch.zeros_like(b_list[0])] + b_list).transpose(1, 2).contiguous()  # (S, R, out)
    bias_all = None
    if any(b is not None for b in biases):
        zeros = torch.zeros(b_t.shape[2], device=b_t.device, dtype=b_t.dtype)
        bias_all = torch.stack([zeros] + [zeros if b is None else b for b in biases])  # (S, out)
    return _Factors(a_t, b_t, bias_all, any(ad.wraps_base_output for ad in adapters))


_VERSION = operator.attrgetter("_version")
_SCALING = operator.attrgetter("scaling")
_DATA_PTR = torch.Tensor.data_ptr


class _Watch(NamedTuple):
    """What a kept stack or plan was built from: slots ``(dicts[i], keys[i])`` and the object each held (a module,
    a factor, or None), the factors' version counters and storage pointers (their storages held, so that no freed
    address comes back under another tensor), and the adapters' scalings."""

    dicts: list[dict]
    keys: list[Any]
    values: list[Any]
    params: list[torch.Tensor]
    versions: list[int]
    pointers: list[int]
    storages: list[Any]
    adapters: list[nn.Module]
    scalings: list[float]


def _watched_slots(ad: nn.Module) -> list[tuple[dict, str]]:
    """``_adapter_slots`` and, on a linear adapter, the ``lora_A``/``lora_B`` submodules holding them (a replaced
    submodule brings its own ``_parameters``)."""
    if isinstance(ad, LoraEmbeddingAdapter):
        return _adapter_slots(ad)
    return [(ad._modules, "lora_A"), (ad._modules, "lora_B"), *_adapter_slots(ad)]


def _watch(slots: list[tuple[dict, Any]], adapters: list[nn.Module]) -> _Watch:
    slots = slots + [slot for ad in adapters for slot in _watched_slots(ad)]
    values = [d.get(k) for d, k in slots]
    params = [v for v in values if isinstance(v, torch.Tensor)]
    return _Watch(
        [d for d, _ in slots], [k for _, k in slots], values, params, list(map(_VERSION, params)),
        list(map(_DATA_PTR, params)), [p.untyped_storage() for p in params], list(adapters),
        list(map(_SCALING, adapters)),
    )


def _unchanged(w: _Watch) -> bool:
    """Whether every slot holds the same object, every factor has the same version counter and storage, and every
    scaling is the same, checked with C-level maps only (no Python loop: this runs on every call of a decode loop).

    In-place ops on a parameter bump its version counter and ``.data =`` moves its storage, so both are seen; an
    in-place op through ``.data`` (``p.data.mul_()``, ``p.data.copy_()``) is not: ``.data`` has its own version
    counter, and the stale stack is served. Update the parameter itself under ``torch.no_grad()`` (``p.mul_()``,
    ``p.copy_()``, as optimizers do) or assign a new tensor; or call :func:`clear_mixed_caches` after a ``.data``
    update."""
    return (
        all(map(operator.is_, map(dict.get, w.dicts, w.keys), w.values))
        and list(map(_VERSION, w.params)) == w.versions
        and list(map(_DATA_PTR, w.params)) == w.pointers
        and list(map(_SCALING, w.adapters)) == w.scalings
    )


class _FactorCache(NamedTuple):
    generation: int
    adapters: list[nn.Module]
    watch: _Watch
    factors: _Factors


def _cached_factors(wrapper: nn.Module, adapters: list[nn.Module]) -> _Factors:
    """``_stack_factors``, reused across inference calls while ``_unchanged`` (same submodules and factor tensors,
    same storages and version counters, same scalings). A whole model's decode step runs this for every adapted
    layer when it does not reuse the last call's plans (``_call_rows``); the Python version of this check (a loop
    over the slots, then tuples of pointers and versions) took ~25 us per layer there."""
    c: _FactorCache | None = wrapper.__dict__.get("_mixed_factors")
    if c is not None and c.generation == _generation and c.adapters == adapters and _unchanged(c.watch):
        return c.factors
    watch = _watch([], adapters)  # before stacking: a change during the stacking is seen next time
    factors = _stack_factors(adapters)
    wrapper._mixed_factors = _FactorCache(_generation, list(adapters), watch, factors)
    return factors


def clear_mixed_caches(module: nn.Module) -> None:
    """Drops every mixed-batch cache that ``module`` and the wrappers under it hold across calls: a wrapper's
    stacked factors (``_mixed_factors``, which also holds the factors it was stacked from) and row -> slot indices
    (``_mixed_slots``), a model's last call (``_mixed_call``, whose plans hold stacked factors too); and makes every
    other kept stack and call stale (a global generation), so that nothing stacked before this call is served
    again. The next mixed call builds them again. For ``delete_adapter``, whose adapter these would keep alive, and
    after an in-place update through ``.data``, which the caches cannot see (pass the model or the layer). Any
    module may be passed; one without caches is unchanged."""
    global _generation
    _generation += 1
    for m in (module, *_wrappers(module)):
        m.__dict__.pop("_mixed_factors", None)
        m.__dict__.pop("_mixed_slots", None)
        m.__dict__.pop("_mixed_call", None)


def _plan(wrapper: nn.Module, batch: int, device: torch.device) -> _Plan | None:
    """What ``wrapper`` runs for a batch of ``batch`` rows in this call; None when no row has one of its adapters."""
    rows: RowAdapters = wrapper.row_adapters
    grad = torch.is_grad_enabled()
    memo_key = (id(wrapper), batch)
    plan = rows.memo.get(memo_key)
    if plan is not None and (grad or plan.factors is not None):
        return _Plan(plan.adapters, plan.slots, None) if grad else plan
    own = wrapper._modules["adapters"]._modules  # not through nn.Module.__getattr__ (see _adapter_slots)
    present = tuple(n for n in rows.unique if n in own)
    if not present:
        return None
    slots_key = (rows.key, present, batch, device)  # kept on the wrapper across calls with the same rows
    cached = wrapper.__dict__.get("_mixed_slots")
    if cached is not None and cached[0] == slots_key:
        slots = cached[1]
    else:
        slots = rows.memo.get(slots_key)
        if slots is None:
            slots = rows.memo[slots_key] = _Slots(rows.for_batch(batch), present, device)
        wrapper._mixed_slots = (slots_key, slots)
    adapters = [own[n] for n in present]
    keep = not (grad or torch._C._are_functorch_transforms_active())  # (see _call_rows)
    plan = _Plan(adapters, slots, _cached_factors(wrapper, adapters) if keep else None)
    rows.memo[memo_key] = plan
    return plan


def _magnitudes(wrapper: nn.Module, adapters: list[nn.Module], b_t: torch.Tensor) -> torch.Tensor:
    """``g_all`` (n+1, out): DoRA's ``m / ||W + s B A||_c`` per slot, 1 for LoRA slots."""
    ones = torch.ones(b_t.shape[2], device=b_t.device, dtype=b_t.dtype)  # (out,)
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


def mixed_linear_forward(
    wrapper: nn.Module, x: torch.Tensor, result: torch.Tensor, own_result: bool = False
) -> torch.Tensor:
    """``result`` (batch, ..., out) plus each row's adapter on ``x`` (batch, ..., in). ``own_result``: no one else
    holds ``result`` (the caller computed it with F.linear, which does not keep its output for backward), so the
    grouped form adds into it in place."""
    plan = _plan(wrapper, x.shape[0], x.device)
    if plan is None:
        return result
    adapters, idx = plan.adapters, plan.slots.idx
    f = plan.factors if plan.factors is not None else _stack_factors(adapters)
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != f.a_t.dtype:
        x = x.to(f.a_t.dtype)
    batch, out = x.shape[0], result.shape[-1]
    x3 = _dropped(x, adapters, idx, wrapper.training).reshape(batch, -1, x.shape[-1])  # (batch, T, in)
    groups = plan.slots
    if groups.grouped and x3.shape[1] <= _GROUPED_TOKENS:  # decode-like, little padding: rows grouped by adapter
        xg = x3.index_select(0, groups.gather).view(len(adapters), -1, x3.shape[-1])  # (n, G*T, in)
        lora = torch.bmm(torch.bmm(xg, f.a_t[1:]), f.b_t[1:])  # (n, G*T, R) -> (n, G*T, out)
        lora = lora.view(groups.rows, *result.shape[1:])  # (n*G, ..., out)
        if groups.pads is not None:
            lora.index_fill_(0, groups.pads, 0.0)  # bmm keeps its inputs for backward, not its output
        lora = lora.to(result.dtype)
        if f.bias_all is None and not f.dora:
            if own_result:
                return result.index_add_(0, groups.dest, lora)  # (batch, ..., out)
            return result.index_add(0, groups.dest, lora)
        lora = torch.zeros_like(result).index_add(0, groups.dest, lora)
    else:
        h = torch.bmm(x3, f.a_t[idx])  # (batch, T, R)
        lora = torch.bmm(h, f.b_t[idx])  # (batch, T, out)
        lora = lora.reshape(result.shape).to(result.dtype)  # (batch, ..., out)
    row_shape = (batch, *([1] * (result.dim() - 2)), out)
    if f.bias_all is not None:
        lora = lora + f.bias_all[idx].view(row_shape).to(result.dtype)
    if not f.dora:
        return result + lora
    g = _magnitudes(wrapper, adapters, f.b_t)[idx].view(row_shape).to(result.dtype)  # (batch, 1.., out)
    bias = getattr(wrapper.base_layer, "bias", None)
    if bias is None:
        return (result + lora) * g
    bias = bias.to(result.dtype)
    return (result - bias + lora) * g + bias


def mixed_embedding_forward(wrapper: nn.Module, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (batch, T, dim) plus each row's embedding adapter on ``ids`` (batch, T)."""
    plan = _plan(wrapper, ids.shape[0], ids.device)
    if plan is None:
        return result
    base = wrapper.base_layer
    if base.max_norm is not None:  # the single-adapter path renormalises rows of lora_embedding_A in place
        raise NotImplementedError(
            f"adapter_names= on an embedding with max_norm={base.max_norm}: use one adapter per call for it."
        )
    if base.sparse and torch.is_grad_enabled():
        raise NotImplementedError(
            "adapter_names= training an embedding with sparse=True (the stacked factors take dense gradients): "
            "use one adapter per call, or sparse=False."
        )
    adapters, idx = plan.adapters, plan.slots.idx
    f = plan.factors if plan.factors is not None else _stack_factors(adapters)  # (S, vocab, R), (S, R, dim)
    ids2 = ids.reshape(ids.shape[0], -1)  # (batch, T)
    slots, vocab, rank = f.a_t.shape
    # One lookup in the (S * vocab, R) table: scale_grad_by_freq then counts each adapter's tokens apart, as a
    # sub-batch of its rows through that adapter would; the pad token's row gets no gradient, as F.embedding's
    # padding_idx gives (its value is looked up all the same).
    h = F.embedding(idx[:, None] * vocab + ids2, f.a_t.view(slots * vocab, rank),
                    scale_grad_by_freq=base.scale_grad_by_freq)  # (batch, T, R)
    if base.padding_idx is not None and h.requires_grad:
        h = torch.where((ids2 == base.padding_idx).unsqueeze(-1), h.detach(), h)
    lora = torch.bmm(h, f.b_t[idx]).reshape(result.shape).to(result.dtype)  # (batch, T, dim)
    if not f.dora:
        return result + lora
    g = _magnitudes(wrapper, adapters, f.b_t)[idx].view(ids.shape[0], *([1] * (result.dim() - 2)), -1)
    return (result + lora) * g.to(result.dtype)


def mixed_modules_to_save_forward(wrapper: ModulesToSaveWrapper, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Row ``i`` of ``x`` (batch, ...) through adapter ``adapter_names[i]``'s copy of the module, or through the
    original module for ``"__base__"`` and adapters without a copy (PEFT's rule). Rows are grouped by module, each
    module runs once on its rows, and one gather puts the outputs back in row order:

        y = cat_g(module_g(x[rows_g]))[inverse],   inverse = argsort(cat_g(rows_g))     (batch, ...)

    Other arguments go whole to every module, as in PEFT."""
    rows: RowAdapters = wrapper.row_adapters
    batch = x.shape[0]
    key = (id(wrapper), batch, x.device)  # the memo outlives the call (_call_rows): its index tensors are on a device
    groups = rows.memo.get(key)
    if groups is None:
        copies = wrapper.modules_to_save._modules
        by_module: dict[nn.Module, list[int]] = {}
        for i, name in enumerate(rows.for_batch(batch)):
            by_module.setdefault(copies.get(name, wrapper.original_module), []).append(i)
        if len(by_module) == 1:
            groups = (next(iter(by_module)), [], None)
        else:
            with torch.inference_mode(False):  # kept across calls (see _Slots)
                index = [torch.tensor(r, device=x.device) for r in by_module.values()]
                groups = (None, list(zip(by_module, index, strict=True)), torch.argsort(torch.cat(index)))
        rows.memo[key] = groups
    only, parts, inverse = groups
    if only is not None:  # every row uses the same module
        return only(x, *args, **kwargs)
    outs = [module(x.index_select(0, index), *args, **kwargs) for module, index in parts]
    return torch.cat(outs)[inverse]  # (batch, ...)
