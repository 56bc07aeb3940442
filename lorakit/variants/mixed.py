"""Mixed-adapter batches: each row of a batch runs its own adapter (``"__base__"``: none).

``PeftModel.forward/generate(..., adapter_names=rows)`` builds a ``MixedBatch`` for the call (the rows, and per
layer the stacked factors and row -> slot indices, built on first use) and makes it current
(``lorakit.dispatch.MIXED_BATCH``) for the call; it is dropped when the call returns. Where reuse pays (decode
loops, serving), ``stack = peft_model.stack_adapters(names)`` is an ``AdapterStack`` the caller owns: the stacked
factors of those adapters in every layer, passed as ``adapter_stack=stack``. Before each use the stack checks that
nothing it was built from changed: the same adapter modules and tensors (identity and storage), the same version
counters (in-place updates: optimizer steps, ``load_adapter``, hotswap) and scalings, and no access to ``.data``
(an in-place write through ``.data`` does not bump the version counter; adapter tensors are ``AdapterParameter``s,
which count those accesses, and any other tensor a variant stacks is compared by value); if anything changed it
rebuilds itself.

With ``n`` adapters of ranks ``r_i`` padded to ``R = max r_i`` (zero rows of A and zero columns of B add nothing)
and slot 0 all zeros for ``"__base__"``:

    A_all (n+1, R, in),  B_all (n+1, out, R) = s_i B_i,   idx (batch,) row -> slot   (kept transposed, contiguous)
    h = bmm(x, A_all[idx]^T)        (batch, T, R)
    y = result + bmm(h, B_all[idx]^T)                       (batch, T, out)
    few tokens per row (decode) and n G <= 2 batch, no copies of the factors: rows grouped by slot, each group
    padded to the largest, G (gather (n G,), dest (n G,): row of each position; pad outputs zeroed),
        x_g = x[gather].view(n, G T, in)
        y = result.index_add(0, dest, bmm(bmm(x_g, A_all[1:]^T), B_all[1:]^T))     (n, G T, R) -> (n G, T, out)
    adapters with an output scale g (DoRA): y = (result - b + bmm(...)) * g_all[idx] + b,   1 for the others

The factors each adapter contributes are its ``stack_factors()``; its scale ``output_scale(wrapper)``.
modules_to_save: row ``i`` goes through adapter ``adapter_names[i]``'s copy of the module, or the original module
("__base__", adapters without a copy); each module runs once on its own rows.

Gathering keeps autograd, so mixed batches train (the factors are then stacked in the graph on every forward, never
kept). Per-row dropout uses each adapter's own ``p``. Gradient checkpointing recomputes layers after the call: the
checkpoint functions of the model's layers are wrapped once (``install_checkpoint_rows``, when the ``PeftModel`` is
built and by its ``gradient_checkpointing_enable``) so that a layer checkpointed during a mixed call recomputes
under the same ``MixedBatch``.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapter import data_reads
from lorakit.dispatch import MIXED_BATCH, mixed_batch_context
from lorakit.layers import LORA_WRAPPERS, LoraEmbedding, ModulesToSaveWrapper

BASE = "__base__"
#: Up to this many tokens per row, rows are grouped by adapter (copies of x, batch T in) rather than the factors
#: gathered per row (batch R (in + out)). bench_variants' layers, 32 rows over 8 adapters, r=16, in 256 and 688, one
#: layer timed alone: grouping took 0.13-0.28x the gathered form's time at 1 and 4 tokens. At 64 tokens it took
#: 0.67-0.92x alone, but the whole model's time did not move (bench_mixed, 2 runs), so long rows keep the form
#: that does not pad.
_GROUPED_TOKENS = 4
#: ... and while the groups, each padded to the largest, hold at most this many positions per row of the batch
#: (n*G <= 2 batch). A skewed batch pads without bound (25 rows on one adapter and 7 on one each: n*G = 8*25 = 200
#: for 32 rows), and there the gathered form, which does not pad, wins. At 2 the grouped form does at most twice
#: the unpadded case's work, which took 0.13-0.28x the gathered form's time; that its time grows about linearly in
#: its rows is assumed here, not measured.
_GROUPED_PADDING = 2
_WRAPPERS = (*LORA_WRAPPERS, ModulesToSaveWrapper)


def wrappers_of(model: nn.Module) -> list[nn.Module]:
    """Every LoRA and modules_to_save wrapper in ``model``. Does not walk a LoRA wrapper's own adapters: with many
    adapters they are most of the model's submodules."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, _WRAPPERS):
            found.append(module)
            if isinstance(module, LORA_WRAPPERS):
                continue
        stack.extend(m for m in module._modules.values() if m is not None)
    return found


# ---- stacked factors -----------------------------------------------------------------------------------------
class _Factors(NamedTuple):
    """The adapters' factors, stacked with slot 0 all zeros and the scaling folded into B."""

    a_t: torch.Tensor  # (S, in, R): A_all^T, contiguous (row gathers read whole R-vectors)
    b_t: torch.Tensor  # (S, R, out): B_all^T, contiguous
    bias_all: torch.Tensor | None  # (S, out): s_i * lora_B.bias (lora_bias), None if no adapter has one


def stack_factors(adapters: Sequence[nn.Module]) -> _Factors:
    """``_Factors`` of ``adapters`` (slot i+1 holds adapters[i]), from each one's ``stack_factors()``."""
    parts = [ad.stack_factors() for ad in adapters]  # (A (r, in), s B (out, r), s bias or None)
    rank = max(a.shape[0] for a, _, _ in parts)
    a_list = [F.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _, _ in parts]  # (R, in)
    b_list = [F.pad(b, (0, rank - b.shape[1])) for _, b, _ in parts]  # (out, R)
    a_t = torch.stack([torch.zeros_like(a_list[0])] + a_list).transpose(1, 2).contiguous()  # (S, in, R)
    b_t = torch.stack([torch.zeros_like(b_list[0])] + b_list).transpose(1, 2).contiguous()  # (S, R, out)
    bias_all = None
    if any(bias is not None for _, _, bias in parts):
        zeros = torch.zeros(b_t.shape[2], device=b_t.device, dtype=b_t.dtype)
        bias_all = torch.stack([zeros] + [zeros if bias is None else bias for _, _, bias in parts])  # (S, out)
    return _Factors(a_t, b_t, bias_all)


class _Layer(NamedTuple):
    """One wrapper's part of a stack: the stack's names it holds (slot i+1: names[i]) and their stacked factors
    (None: not built, or under autograd)."""

    names: tuple[str, ...]
    adapters: tuple[nn.Module, ...]
    factors: _Factors | None


def _layer(wrapper: nn.Module, names: Sequence[str], build: bool) -> _Layer:
    own = wrapper._modules["adapters"]._modules  # not through nn.Module.__getattr__ (~1 us a lookup)
    present = tuple(n for n in names if n in own)
    adapters = tuple(own[n] for n in present)
    factors = None
    if build and adapters:
        with torch.no_grad(), torch.inference_mode(False):  # kept across calls, maybe one with gradients
            factors = stack_factors(adapters)
    return _Layer(present, adapters, factors)


def _tensor_slots(ad: nn.Module) -> list[tuple[dict, str]]:
    """Where each tensor of ``ad`` lives: ``(module._parameters, name)``, and for ``"sub.name"`` suffixes also
    ``(ad._modules, "sub")`` (a replaced submodule brings its own parameters)."""
    slots = []
    for suffix, _ in type(ad).TENSOR_SUFFIXES:
        owner_name, _, name = suffix.rpartition(".")
        owner = ad
        if owner_name:
            slots.append((ad._modules, owner_name))
            owner = ad._modules.get(owner_name)
            if owner is None:
                continue
        slots.append((owner._parameters, name))
    return slots


_VERSION = operator.attrgetter("_version")
_READS = operator.attrgetter("data_reads")
_SCALING = operator.attrgetter("scaling")
_MERGED = operator.attrgetter("merged_adapters")
_DATA_PTR = torch.Tensor.data_ptr


class _Watch(NamedTuple):
    """What a stack was built from: slots ``(dicts[i], keys[i])`` and the object each held (a module, a tensor or
    None), the tensors' version counters, ``.data`` read counts (``AdapterParameter``) and storage pointers (their
    storages held, so that no freed address comes back under another tensor), the adapters' scalings, and one flat
    copy of the values of the tensors whose ``.data`` is not counted (a variant's own plain ``nn.Parameter``)."""

    dicts: list[dict]
    keys: list[Any]
    values: list[Any]
    params: list[torch.Tensor]
    versions: list[int]
    counted: list[torch.Tensor]  # the AdapterParameters among params
    reads: list[int]
    pointers: list[int]
    storages: list[Any]
    adapters: list[nn.Module]
    scalings: list[float]
    uncounted: list[torch.Tensor]
    snapshot: torch.Tensor | None
    scratch: torch.Tensor | None  # the buffer each check copies the current values into


def _flat(params: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every tensor's values in one flat tensor (into ``out`` when given: no allocation per check)."""
    if not params:
        return None
    with torch.no_grad(), torch.inference_mode(False):
        flat = [p.detach().reshape(-1) for p in params]
        return torch.cat(flat) if out is None else torch.cat(flat, out=out)


def _watch(slots: list[tuple[dict, Any]], adapters: list[nn.Module]) -> _Watch:
    slots = slots + [slot for ad in adapters for slot in _tensor_slots(ad)]
    values = [d.get(k) for d, k in slots]
    params = [v for v in values if isinstance(v, torch.Tensor)]
    counted = [p for p in params if data_reads(p) is not None]
    uncounted = [p for p in params if data_reads(p) is None]
    snapshot = _flat(uncounted)
    return _Watch(
        [d for d, _ in slots], [k for _, k in slots], values, params, list(map(_VERSION, params)), counted,
        list(map(_READS, counted)),
        list(map(_DATA_PTR, params)), [p.untyped_storage() for p in params], list(adapters),
        list(map(_SCALING, adapters)), uncounted, snapshot, None if snapshot is None else torch.empty_like(snapshot),
    )


def _unchanged(w: _Watch) -> bool:
    """Whether every slot holds the same object, every tensor has the same version counter, ``.data`` read count
    and storage, every scaling is the same, and the uncounted tensors hold the same values. An in-place write
    through ``.data`` changes neither version nor storage: an ``AdapterParameter`` counts the ``.data`` access, any
    other tensor is compared by value (one ``cat`` and one ``equal``). The other checks are C-level maps, run on
    every call of a decode loop."""
    return (
        all(map(operator.is_, map(dict.get, w.dicts, w.keys), w.values))
        and list(map(_VERSION, w.params)) == w.versions
        and list(map(_READS, w.counted)) == w.reads
        and list(map(_DATA_PTR, w.params)) == w.pointers
        and list(map(_SCALING, w.adapters)) == w.scalings
        and (w.snapshot is None or torch.equal(_bits(_flat(w.uncounted, w.scratch)), _bits(w.snapshot)))
    )


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """``flat``'s bytes as integers: bit equality (NaN equals itself), and 8-byte words compare about twice as fast
    as fp32 elements on CPU."""
    if flat.numel() * flat.element_size() % 8 == 0:
        return flat.view(torch.int64) if flat.element_size() == 8 else flat.view(torch.uint8).view(torch.int64)
    return flat.view(torch.uint8)


class AdapterStack:
    """The stacked factors of the adapters ``names`` in every layer of a model: built by
    ``PeftModel.stack_adapters(names)``, owned by the caller, passed as ``adapter_stack=`` to ``forward`` /
    ``generate`` with ``adapter_names=`` rows drawn from ``names`` (or ``"__base__"``). Checked before each use and
    rebuilt if any adapter module, tensor (identity, storage, version counter or values) or scaling it was built
    from changed; ``refresh()`` raises if one of ``names`` no longer exists."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = tuple(dict.fromkeys(names))
        self._model = model
        self._build()

    def _build(self) -> None:
        self._wrappers = wrappers_of(self._model)
        self._lora = [w for w in self._wrappers if isinstance(w, LORA_WRAPPERS)]
        self._layers = {id(w): (w, _layer(w, self.names, build=True)) for w in self._lora}
        slots: list[tuple[dict, Any]] = []
        adapters: list[nn.Module] = []
        for w in self._wrappers:
            if isinstance(w, LORA_WRAPPERS):
                own = w._modules["adapters"]._modules
                slots.append((w._modules, "adapters"))
                slots += [(own, n) for n in self.names]
                adapters += self._layers[id(w)][1].adapters
            else:
                copies = w._modules["modules_to_save"]._modules
                slots += [(w._modules, "modules_to_save"), (w._modules, "original_module")]
                slots += [(copies, n) for n in self.names]
        self._watch = _watch(slots, adapters)
        self._slots: dict[Any, _Slots] = {}

    def refresh(self, known: Sequence[str]) -> None:
        """Rebuild if anything the stack was built from changed; raise if one of its names is not in ``known``."""
        missing = [n for n in self.names if n not in known]
        if missing:
            raise ValueError(
                f"adapter_stack holds adapters {missing} that the model no longer has (deleted?); build a new stack "
                f"with peft_model.stack_adapters(names) from {sorted(known)}."
            )
        if not _unchanged(self._watch):
            self._build()

    def merged(self) -> list[str]:
        return sorted({n for names in map(_MERGED, self._lora) for n in names})

    def layer(self, wrapper: nn.Module) -> _Layer:
        entry = self._layers.get(id(wrapper))
        if entry is not None and entry[0] is wrapper:
            return entry[1]
        return _layer(wrapper, self.names, build=False)  # a wrapper made after the stack: nothing kept for it


# ---- one call ------------------------------------------------------------------------------------------------
class MixedBatch:
    """One call's per-row adapter names, the stack it draws factors from (the caller's ``AdapterStack``, or None:
    each layer stacks its own on first use, kept for the call), and the call's memo (each layer's plan, row -> slot
    indices shared by layers holding the same adapters)."""

    def __init__(self, names: Sequence[str], stack: AdapterStack | None) -> None:
        self.key = tuple(names)
        self.unique = tuple(dict.fromkeys(names))
        self.stack = stack
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

    # what the wrappers call in a mixed batch (``lorakit.layers``, which does not import this module)
    def linear(self, wrapper: nn.Module, x: torch.Tensor, result: torch.Tensor, own_result: bool = False) -> Any:
        return mixed_linear_forward(wrapper, x, result, own_result)

    def embedding(self, wrapper: LoraEmbedding, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return mixed_embedding_forward(wrapper, ids, result)

    def modules_to_save(self, wrapper: ModulesToSaveWrapper, *args: Any, **kwargs: Any) -> Any:
        return mixed_modules_to_save_forward(wrapper, *args, **kwargs)


@contextlib.contextmanager
def mixed_batch(
    model: nn.Module, adapter_names: Sequence[str], known: Sequence[str], stack: AdapterStack | None = None
) -> Iterator[None]:
    """Within the block, row ``i`` of every batch uses adapter ``adapter_names[i]`` in every wrapper of ``model``."""
    if isinstance(adapter_names, str) or not len(adapter_names):
        raise ValueError(f"adapter_names={adapter_names!r}: pass a list with one adapter name per row.")
    batch = MixedBatch(adapter_names, stack)
    allowed = stack.names if stack is not None else known
    unknown = sorted(n for n in batch.unique if n != BASE and n not in allowed)
    if unknown:
        where = "adapter_stack" if stack is not None else "the model"
        raise ValueError(
            f"adapter_names has unknown adapters {unknown} (not in {where}); available: {sorted(allowed)} or {BASE!r}."
        )
    if stack is not None:
        if stack._model is not model:
            raise ValueError("adapter_stack was built by another model's stack_adapters; build one for this model.")
        if not torch._C._are_functorch_transforms_active():
            stack.refresh(known)
        merged = stack.merged()
    else:
        merged = sorted({n for w in wrappers_of(model) if isinstance(w, LORA_WRAPPERS) for n in w.merged_adapters})
    if merged:
        raise ValueError(f"adapter_names= needs unmerged adapters; {merged} are merged: unmerge first.")
    if torch.is_grad_enabled():
        _check_checkpointing(model)
    with mixed_batch_context(batch):
        yield


# ---- gradient checkpointing ------------------------------------------------------------------------------------
class _RowsCheckpoint:
    """A layer's checkpointing function that runs the checkpointed forward, and its recompute in the backward pass,
    under the ``MixedBatch`` current when the layer was called (None: under none)."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        batch = MIXED_BATCH.get()
        if batch is None:
            return self.func(fn, *args, **kwargs)

        def run(*a: Any, **k: Any) -> Any:
            with mixed_batch_context(batch):
                return fn(*a, **k)

        return self.func(run, *args, **kwargs)


def install_checkpoint_rows(model: nn.Module) -> None:
    """Wrap (once) the checkpointing function transformers gave each checkpointed module
    (``_gradient_checkpointing_func``) in ``_RowsCheckpoint``. Called when a ``PeftModel`` is built and by its
    ``gradient_checkpointing_enable``; nothing is swapped during a call."""
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, _RowsCheckpoint):
            module._gradient_checkpointing_func = _RowsCheckpoint(func)


def _check_checkpointing(model: nn.Module) -> None:
    for module in model.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and getattr(module, "gradient_checkpointing", False):
            if not isinstance(func, _RowsCheckpoint):
                raise ValueError(
                    "adapter_names= with gradients under gradient checkpointing enabled on the base model after the "
                    "PeftModel was built: the recomputed layers would not see the rows. Enable it with "
                    "peft_model.gradient_checkpointing_enable(...) instead."
                )


# ---- plans: which adapters run, row -> slot, stacked factors -------------------------------------------------
class _Slots:
    """Row -> slot indices for one tuple of the layer's adapters (slot 0: none), and the grouped form's rows:
    ``gather`` (n*G,) the rows of the used slots, each group padded to the largest, G, with row 0; ``dest`` (n*G,)
    the row each position adds to; ``pads`` the padded positions (their outputs are zeroed), None without any;
    ``used`` the slot numbers of the groups (None: all of 1..n). ``grouped``: whether the padding is small enough
    for the grouped form (``_GROUPED_PADDING``); without it ``gather``, ``dest``, ``pads`` are None."""

    def __init__(self, names: tuple[str, ...], present: tuple[str, ...], device: torch.device) -> None:
        with torch.inference_mode(False):  # kept across calls: a later call with gradients may save them
            self._build(names, present, device)

    def _build(self, names: tuple[str, ...], present: tuple[str, ...], device: torch.device) -> None:
        slot = {n: i + 1 for i, n in enumerate(present)}
        ids = [slot.get(n, 0) for n in names]
        self.idx = torch.tensor(ids, device=device)  # (batch,)
        used = sorted(set(ids) - {0})
        groups = [[row for row, s in enumerate(ids) if s == k] for k in used]
        self.used = None if len(used) == len(present) else torch.tensor(used, device=device)
        self.n = len(used)
        self.group = max(map(len, groups), default=0)
        self.rows = len(groups) * self.group  # n*G
        self.grouped = bool(used) and self.rows <= _GROUPED_PADDING * len(ids)
        self.gather = self.dest = self.pads = None
        if self.grouped:
            positions = [g[i] if i < len(g) else -1 for g in groups for i in range(self.group)]  # -1: a pad
            pads = [k for k, row in enumerate(positions) if row < 0]
            self.gather = self.dest = torch.tensor([max(row, 0) for row in positions], device=device)  # (n*G,)
            self.pads = torch.tensor(pads, device=device) if pads else None


class _Plan(NamedTuple):
    adapters: tuple[nn.Module, ...]  # slot i+1 holds adapters[i]
    slots: _Slots
    factors: _Factors | None  # None under autograd: stacked again every call (it is in the graph)


def _plan(wrapper: nn.Module, batch: int, device: torch.device) -> _Plan | None:
    """What ``wrapper`` runs for a batch of ``batch`` rows in this call; None when no row has one of its adapters."""
    mb: MixedBatch = MIXED_BATCH.get()
    grad = torch.is_grad_enabled()
    keep = not (grad or torch._C._are_functorch_transforms_active())  # functorch: wrapped tensors, nothing kept
    memo_key = (id(wrapper), batch)
    plan = mb.memo.get(memo_key)
    if plan is not None and (not keep or plan.factors is not None):
        return plan if keep else _Plan(plan.adapters, plan.slots, None)
    layer = mb.stack.layer(wrapper) if mb.stack is not None else _layer(wrapper, mb.unique, build=False)
    if not any(n in mb.unique for n in layer.names):
        return None
    factors = None
    if keep:
        factors = layer.factors if layer.factors is not None else stack_factors(layer.adapters)
    slots_key = (mb.key, layer.names, batch, device)
    cache = mb.stack._slots if mb.stack is not None else mb.memo
    slots = cache.get(slots_key)
    if slots is None:
        slots = cache[slots_key] = _Slots(mb.for_batch(batch), layer.names, device)
    plan = _Plan(layer.adapters, slots, factors)
    mb.memo[memo_key] = plan
    return plan


def _scales(wrapper: nn.Module, adapters: Sequence[nn.Module], b_t: torch.Tensor) -> torch.Tensor | None:
    """``g_all`` (n+1, out): each adapter's ``output_scale`` (DoRA: m / ||W + s B A||_c), 1 for those without one
    and for slot 0; None if no adapter has one."""
    scales = [ad.output_scale(wrapper) for ad in adapters]
    if all(g is None for g in scales):
        return None
    ones = torch.ones(b_t.shape[2], device=b_t.device, dtype=b_t.dtype)  # (out,)
    return torch.stack([ones] + [ones if g is None else g for g in scales])


def _dropped(x: torch.Tensor, adapters: Sequence[nn.Module], idx: torch.Tensor, training: bool) -> torch.Tensor:
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
    f = plan.factors if plan.factors is not None else stack_factors(adapters)
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != f.a_t.dtype:
        x = x.to(f.a_t.dtype)
    batch, out = x.shape[0], result.shape[-1]
    x3 = _dropped(x, adapters, idx, wrapper.training).reshape(batch, -1, x.shape[-1])  # (batch, T, in)
    groups = plan.slots
    g = _scales(wrapper, adapters, f.b_t)
    if groups.grouped and x3.shape[1] <= _GROUPED_TOKENS:  # decode-like, little padding: rows grouped by adapter
        a_t, b_t = (f.a_t[1:], f.b_t[1:]) if groups.used is None else (f.a_t[groups.used], f.b_t[groups.used])
        xg = x3.index_select(0, groups.gather).view(groups.n, -1, x3.shape[-1])  # (n, G*T, in)
        lora = torch.bmm(torch.bmm(xg, a_t), b_t)  # (n, G*T, R) -> (n, G*T, out)
        lora = lora.view(groups.rows, *result.shape[1:])  # (n*G, ..., out)
        if groups.pads is not None:
            lora.index_fill_(0, groups.pads, 0.0)  # bmm keeps its inputs for backward, not its output
        lora = lora.to(result.dtype)
        if f.bias_all is None and g is None:
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
    if g is None:
        return result + lora
    g = g[idx].view(row_shape).to(result.dtype)  # (batch, 1.., out)
    bias = getattr(wrapper.base_layer, "bias", None)
    if bias is None:
        return (result + lora) * g
    bias = bias.to(result.dtype)
    return (result - bias + lora) * g + bias


def mixed_embedding_forward(wrapper: LoraEmbedding, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
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
    f = plan.factors if plan.factors is not None else stack_factors(adapters)  # (S, vocab, R), (S, R, dim)
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
    g = _scales(wrapper, adapters, f.b_t)
    if g is None:
        return result + lora
    g = g[idx].view(ids.shape[0], *([1] * (result.dim() - 2)), -1)
    return (result + lora) * g.to(result.dtype)


def mixed_modules_to_save_forward(wrapper: ModulesToSaveWrapper, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Row ``i`` of ``x`` (batch, ...) through adapter ``adapter_names[i]``'s copy of the module, or through the
    original module for ``"__base__"`` and adapters without a copy (PEFT's rule). Rows are grouped by module, each
    module runs once on its rows, and one gather puts the outputs back in row order:

        y = cat_g(module_g(x[rows_g]))[inverse],   inverse = argsort(cat_g(rows_g))     (batch, ...)

    Other arguments go whole to every module, as in PEFT."""
    mb: MixedBatch = MIXED_BATCH.get()
    batch = x.shape[0]
    key = (id(wrapper), batch, x.device)
    groups = mb.memo.get(key)
    if groups is None:
        copies = wrapper.modules_to_save._modules
        by_module: dict[nn.Module, list[int]] = {}
        for i, name in enumerate(mb.for_batch(batch)):
            by_module.setdefault(copies.get(name, wrapper.original_module), []).append(i)
        if len(by_module) == 1:
            groups = (next(iter(by_module)), [], None)
        else:
            with torch.inference_mode(False):  # (see _Slots)
                index = [torch.tensor(r, device=x.device) for r in by_module.values()]
                groups = (None, list(zip(by_module, index, strict=True)), torch.argsort(torch.cat(index)))
        mb.memo[key] = groups
    only, parts, inverse = groups
    if only is not None:  # every row uses the same module
        return only(x, *args, **kwargs)
    outs = [module(x.index_select(0, index), *args, **kwargs) for module, index in parts]
    return torch.cat(outs)[inverse]  # (batch, ...)
