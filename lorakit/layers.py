"""The wrapper modules that hold named adapters around a frozen base layer.

A wrapper (``LoraLinear``, ``LoraEmbedding``) wraps the base layer it is given (``nn.Linear``, GPT-2 ``Conv1D``,
a 4-bit/8-bit linear, ``nn.Embedding``) and holds one ``Adapter`` (``lorakit.adapter``) per name in ``adapters``.
It never names a variant: the adapter class comes from the ``(base kind, variant)`` table, and the forward asks
each adapter to ``apply`` itself to the base output. ``merge()`` folds each adapter's ``merge_delta`` into the
base weight explicitly; nothing changes weights inside ``train()``, ``eval()`` or ``forward()``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from lorakit import quant
from lorakit.adapter import Adapter, LoraAdapter, LoraEmbeddingAdapter, adapter_class, reserved_names
from lorakit.config import AdapterSpec
from lorakit.dispatch import FUSED, MIXED, MIXED_BATCH, choose_path, fused_weight, has_hooks

__all__ = [
    "LORA_WRAPPERS", "LoraAdapter", "LoraEmbedding", "LoraEmbeddingAdapter", "LoraLinear", "ModulesToSaveWrapper",
    "check_adapter_name", "forwarding_getattr", "warn_if_in_prefix",
]


def check_adapter_name(name: str) -> None:
    """Reject adapter names that would collide with module attributes or file-key markers."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name={name!r} is invalid: it must be a non-empty string.")
    reserved = reserved_names()
    if "." in name or "/" in name or name in reserved:
        raise ValueError(
            f"adapter_name={name!r} collides with lorakit's internal names: choose a name without '.' or '/', "
            f"not one of {sorted(reserved)}."
        )


#: PEFT's key prefix of LoRA parameters (``PEFT_TYPE_TO_PREFIX_MAPPING["LORA"]``).
LORA_PREFIX = "lora_"


def warn_if_in_prefix(name: str) -> None:
    """PEFT's warning for an adapter name contained in ``"lora_"`` (``"lora"``, ``"a"``, ...: PEFT's loading matches
    keys by substring and may take such a name for the prefix). Names that merely start with ``"lora_"``
    (``"lora_x"``) pass, as in PEFT. Called where PEFT warns: ``get_peft_model``, ``add_adapter``,
    ``load_adapter`` of a new adapter."""
    if name in LORA_PREFIX:
        warnings.warn(
            f"Adapter name '{name}' should not be contained in the prefix '{LORA_PREFIX}'. "
            "This may lead to reinitialization of the adapter weights during loading.",
            stacklevel=3,
        )


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 over half-precision or quantized bases (PEFT's ``autocast_adapter_dtype``)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def forwarding_getattr(inner: str, stop: tuple[str, ...] = (), via: Any = None) -> Any:
    """A ``__getattr__`` that reads attributes the module lacks from ``self.<inner>`` (or from ``via(self)``), so
    code that inspects the wrapped module keeps working: the one used by the wrappers, ``LoraModel`` and
    ``PeftModel``. ``inner`` and ``stop`` are never forwarded (they are the module's own, missing only while it is
    being built)."""
    stops = (inner, *stop)

    def __getattr__(self: nn.Module, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in stops:
                raise
            return getattr(via(self) if via is not None else nn.Module.__getattr__(self, inner), name)

    return __getattr__


class _LoraWrapper(nn.Module):
    """State shared by the wrappers: named adapters, which are active, merged, or disabled.

    ``active_adapters`` lists the adapters added in the forward; ``merged_adapters`` those folded into the base
    weight (skipped in the forward); ``disabled`` makes the forward return the base output alone.
    """

    #: The base kind, the first half of an ``ADAPTER_CLASSES`` key.
    kind: str

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        #: The exact quantized base weight while adapters are merged into a 4/8-bit base (``quant.snapshot_weight``).
        self.exact_quantized_base: dict[str, Any] | None = None
        self.disabled = False

    __getattr__ = forwarding_getattr("base_layer")  # weight, in_features, padding_idx ... of the base layer

    # ---- adapters -----------------------------------------------------------------------------------------
    def _base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = getattr(self.base_layer, "weight", None)
        if weight is None or not weight.is_floating_point():
            device = weight.device if weight is not None else None
            return device, torch.float32
        return weight.device, _adapter_dtype(weight.dtype)

    def _adapter_dims(self) -> tuple[int, int]:
        """(input, output) sizes of an adapter of this layer."""
        raise NotImplementedError

    def add_adapter(self, name: str, spec: AdapterSpec) -> Adapter:
        """Create adapter ``name`` from ``spec`` on the base's device (fp32 over half-precision or quantized bases),
        of the class ``ADAPTER_CLASSES[(self.kind, spec.variant)]``."""
        device, dtype = self._base_device_dtype()
        adapter = adapter_class(self.kind, spec.variant)(*self._adapter_dims(), spec, device=device, dtype=dtype)
        self.adapters[name] = adapter
        adapter.after_init(self)
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it.")
        if name in self.adapters:
            del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # ---- the base weight ------------------------------------------------------------------------------------
    def base_weight(self) -> tuple[torch.Tensor, bool]:
        """The base weight as stored (dequantized for 4-bit/8-bit) and whether it is (in, out)."""
        raise NotImplementedError

    def base_weight_fp32(self) -> torch.Tensor:
        """The base weight in the layout of ``delta_weight()`` ((out, in); embeddings (vocab, dim)), fp32."""
        raise NotImplementedError

    def to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Bring a delta (layout of ``delta_weight()``) to the layout of the stored base weight."""
        return delta

    # ---- merging (written once, on the delta) ------------------------------------------------------------
    def _apply_delta(self, name: str, sign: float, safe_merge: bool) -> None:
        adapter: Adapter = self.adapters[name]
        base = self.base_layer
        bias_delta = adapter.bias_delta()
        if bias_delta is not None and base.bias is None:  # refuse before writing anything
            raise ValueError(f"adapter {name!r} has lora_bias but the base layer has no bias to merge it into.")
        delta = self.to_base_layout(adapter.merge_delta(self, sign))
        if quant.is_quantized_linear(base):
            # Merging requantizes W + delta, which rounds; unmerging the last merged adapter puts back the exact
            # quantized base kept at the first merge (one more copy of the quantized weight while merged), so
            # disable_adapter() / unmerge_adapter() give the base's exact outputs however often they run (PEFT
            # requantizes W - delta instead, and the base drifts each round).
            if sign < 0 and not self.merged_adapters and self.exact_quantized_base is not None:
                quant.restore_weight_(base, self.exact_quantized_base)  # the bias too
                self.exact_quantized_base = None
                return
            weight = quant.dequantize_weight(base) + delta.to(torch.float32)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"merging adapter {name!r} would produce non-finite weights; merge aborted.")
            if self.exact_quantized_base is None:
                self.exact_quantized_base = quant.snapshot_weight(base)
            quant.requantize_weight_(base, weight)
            warnings.warn(
                "Merging LoRA into a quantized base requantizes the weight, which drifts from the unmerged model "
                "(unmerging restores the exact base). For exact merged results merge onto the full-precision base: "
                "load it separately and call PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().",
                stacklevel=4,
            )
        else:
            weight = base.weight
            merged = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} would produce non-finite weights; merge aborted.")
            with torch.no_grad():  # not through ``.data``: the write must bump the version (DoRA's norm cache)
                weight.copy_(merged)
        if bias_delta is not None:
            base.bias.data += (bias_delta * sign).to(base.bias.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        """A copy of the base weight in the layout of ``delta_weight()`` (fp32) with every merged adapter taken out
        again, newest first: the weight the forward sees while nothing is merged (DoRA's norm is taken on it)."""
        weight = self.base_weight_fp32().clone()
        for name in reversed(self.merged_adapters):
            weight = self.adapters[name].before_merge(weight)
        return weight

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold ``scaling * B @ A`` of each named (default: active) adapter into the base weight. Idempotent:
        an adapter already merged is skipped."""
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.adapters and name not in self.merged_adapters:
                self._apply_delta(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self, keep: int = 0) -> None:
        """Subtract merged adapters' deltas again, newest first, until ``keep`` remain merged. Idempotent."""
        while len(self.merged_adapters) > keep:
            name = self.merged_adapters.pop()
            self._apply_delta(name, -1.0, safe_merge=False)

    def _adapters_to_run(self) -> list[Adapter]:
        if self.disabled:
            return []
        return [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters]


class LoraLinear(_LoraWrapper):
    """LoRA around a linear-like base: ``nn.Linear``, GPT-2 ``Conv1D`` (``fan_in_fan_out``), or a quantized
    linear (lorakit's or bitsandbytes' 4-bit/8-bit)."""

    kind = "linear"

    #: The fused autograd (``lorakit.kernels.lora_fused``). ``None`` (default): in fp32/fp64 training wherever it
    #: computes what the plain path computes; ``True`` (``PeftModel.enable_fused_lora``): wherever it applies, the
    #: adapter then running in the compute dtype (over half precision outputs differ by rounding); ``False``
    #: (``enable_fused_lora(False)``): never. The rules: ``lorakit.dispatch.choose_path``.
    use_fused: bool | None = None

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = fan_in_fan_out

    def _adapter_dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def to_base_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta  # Conv1D stores (in, out)

    def base_weight(self) -> tuple[torch.Tensor, bool]:
        if quant.is_quantized_linear(self.base_layer):
            return quant.dequantize_weight(self.base_layer), False
        return self.base_layer.weight, self.fan_in_fan_out

    def base_weight_fp32(self) -> torch.Tensor:
        weight, transposed = self.base_weight()
        return (weight.T if transposed else weight).float()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self._adapters_to_run()
        path = choose_path(self, x, adapters, bool(args or kwargs))
        if path == FUSED:
            weight = fused_weight(self.base_layer, x, self.fan_in_fan_out)
            out = adapters[0].fused_forward(x, self, weight, self.training)
            if out is not None:
                return out
        elif path == MIXED:  # the call's MixedBatch (lorakit.variants.mixed) computes the rows' adapters
            batch = MIXED_BATCH.get()
            base = self._modules["base_layer"]
            if not args and not kwargs and type(base) is nn.Linear and not has_hooks(base):
                # what calling it runs, minus nn.Module.__call__; the output is then ours alone, so the adapters may
                # be added into it in place (not under torch.func / forward AD, where the added term may be batched
                # or dual while the base output is not)
                plain = not (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0)
                return batch.linear(self, x, F.linear(x, base.weight, base.bias), own_result=plain)
            return batch.linear(self, x, base(x, *args, **kwargs))
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        for adapter in adapters:
            result = adapter.apply(x, result, self)
        return result


class LoraEmbedding(_LoraWrapper):
    """LoRA around an ``nn.Embedding`` (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``)."""

    kind = "embedding"

    def _adapter_dims(self) -> tuple[int, int]:
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def base_weight(self) -> tuple[torch.Tensor, bool]:
        """The weight (vocab, dim): the transpose of the (out=dim, in=vocab) orientation."""
        return self.base_layer.weight, True

    def base_weight_fp32(self) -> torch.Tensor:
        """The weight (vocab, dim) in fp32: the layout of ``delta_weight()``."""
        return self.base_layer.weight.float()

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(ids, *args, **kwargs)  # (..., dim)
        batch = MIXED_BATCH.get()
        if batch is not None and not self.disabled:
            return batch.embedding(self, ids, result)
        for adapter in self._adapters_to_run():
            result = adapter.apply(ids, result, self)
        return result


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: one trainable copy per adapter in ``modules_to_save``; ``original_module`` is
    kept untouched and used when no adapter is active or adapters are disabled (PEFT's layout and keys). In a
    mixed batch, row ``i`` goes through its adapter's copy (the original module for ``"__base__"`` or no copy)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    __getattr__ = forwarding_getattr("original_module", stop=("modules_to_save",), via=lambda m: m.active_module)

    def add_adapter(self, name: str, trainable: bool) -> None:
        import copy

        if name not in self.modules_to_save:
            clone = copy.deepcopy(self.original_module)
            clone.requires_grad_(trainable)
            self.modules_to_save[name] = clone
        self.original_module.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: list[str]) -> None:
        chosen = [n for n in names if n in self.modules_to_save]
        if len(chosen) > 1:
            raise ValueError(
                f"modules_to_save: adapters {chosen} each have their own copy of this module; only one can be "
                "active at a time."
            )
        self.active_adapter = chosen[0] if chosen else None

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch = MIXED_BATCH.get()
        if batch is not None and not self.disabled:
            return batch.modules_to_save(self, *args, **kwargs)
        return self.active_module(*args, **kwargs)


LORA_WRAPPERS = (LoraLinear, LoraEmbedding)
