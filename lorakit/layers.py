"""LoRA adapters and the wrapper modules that hold them around a frozen base layer.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): for a frozen base ``y = W x (+ b)`` with ``W`` (out, in),

    y = W x (+ b) + scaling * B (A dropout(x)),   A: (r, in), B: (out, r), scaling = alpha / r  (rsLoRA: / sqrt(r))

computed on activations: ``B @ A`` is never built in the forward. ``merge()`` folds ``scaling * B @ A`` into ``W``
explicitly; nothing changes weights inside ``train()``, ``eval()`` or ``forward()``.

A wrapper (``LoraLinear``, ``LoraEmbedding``) wraps the base layer it is given (``nn.Linear``, GPT-2 ``Conv1D``,
a 4-bit/8-bit linear, ``nn.Embedding``) and holds one small module per named adapter in ``adapters``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from lorakit import quant
from lorakit.config import lora_scaling
from lorakit.quant.matmul import DequantLinearModule

#: Names an adapter may not take: they are attribute names inside wrappers, PEFT's file-key markers, or reserved.
RESERVED_ADAPTER_NAMES = frozenset(
    {
        "base_layer",
        "adapters",
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "modules_to_save",
        "original_module",
        "weight",
        "bias",
        "__base__",
    }
)


def check_adapter_name(name: str) -> None:
    """Reject adapter names that would collide with module attributes or file-key markers."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name={name!r} is invalid: it must be a non-empty string.")
    if "." in name or "/" in name or name in RESERVED_ADAPTER_NAMES:
        raise ValueError(
            f"adapter_name={name!r} collides with lorakit's internal names: choose a name without '.' or '/', "
            f"not one of {sorted(RESERVED_ADAPTER_NAMES)}."
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


def _empty_linear(
    in_features: int, out_features: int, bias: bool, device: torch.device | None, dtype: torch.dtype
) -> nn.Linear:
    """An ``nn.Linear`` with uninitialised storage. ``nn.Linear(...)`` runs its own random init, which the
    adapter's init overwrites at once; on models with thousands of targets (and on the meta device, where
    random init goes through slow decompositions) that wasted init dominated injection time."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    linear.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
    return linear


class LoraAdapter(nn.Module):
    """One named adapter of a linear layer: ``scaling * lora_B(lora_A(dropout(x)))``.

    Shapes: ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), ``lora_B.bias`` (out) with ``lora_bias``.
    """

    #: True for variants (DoRA) that transform the base output instead of adding to it.
    wraps_base_output = False
    #: The fused autograd (``lorakit.kernels.lora_fused``) computes this class's forward. Read from the class's own
    #: namespace: a subclass is fused only if it sets this itself.
    fusable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_bias: bool = False,
        init_lora_weights: bool | str = True,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = _empty_linear(in_features, r, False, device, dtype)
        self.lora_B = _empty_linear(r, out_features, lora_bias, device, dtype)
        if self.lora_A.weight.device.type != "meta":  # meta tensors hold no values to initialise
            self.reset_parameters(init_lora_weights)

    def reset_parameters(self, init_lora_weights: bool | str) -> None:
        """PEFT's init: A Kaiming-uniform (a=sqrt(5)) and B = 0; ``"gaussian"``: A ~ N(0, 1/r);
        ``False``: nn.Linear's default random init for both (B != 0; for tests)."""
        with torch.no_grad():
            if init_lora_weights is False:
                self.lora_A.reset_parameters()
                self.lora_B.reset_parameters()
                return
            if init_lora_weights is True:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            elif init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                raise ValueError(f"init_lora_weights={init_lora_weights!r}; allowed: True, False, 'gaussian'.")
            nn.init.zeros_(self.lora_B.weight)
            if self.lora_B.bias is not None:
                nn.init.zeros_(self.lora_B.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out). Under autocast the matmuls run in the autocast dtype; otherwise x is
        # brought to the adapter's own dtype (no copy when the dtypes already agree, none when dropout is off).
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result + scaling * B(A(dropout(x)))`` with the scaling folded into one fused add (one full-size
        temporary and one elementwise pass fewer than ``result + forward(x)``)."""
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        h = self.lora_B(self.lora_A(self.dropout(x)))  # (..., out)
        return torch.add(result, h.to(result.dtype), alpha=self.scaling)

    def fused_forward(self, x: torch.Tensor, wrapper: nn.Module, weight: Any, training: bool) -> torch.Tensor:
        """``wrapper``'s output through the fused autograd (``lorakit.kernels.lora_fused.lora_linear``);
        ``weight``: the frozen base weight (out, in) or a callable dequantizing it (``LoraLinear._fused_weight``)."""
        from lorakit.kernels.lora_fused import lora_linear

        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return lora_linear(
            x, weight, wrapper.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, p, training,
            self.lora_B.bias,
        )

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out, in), in fp32 (the one place the full delta is built: merging)."""
        a = self.lora_A.weight.float()  # (r, in)
        b = self.lora_B.weight.float()  # (out, r)
        return (b @ a) * self.scaling


class LoraEmbeddingAdapter(nn.Module):
    """One named adapter of an embedding: ``scaling * embed(ids, A^T) @ B^T``.

    Shapes (PEFT's keys): ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (embedding_dim, r).
    Default init is the reverse of the linear case (A = 0, B normal), as in PEFT and loralib.
    """

    wraps_base_output = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_bias: bool = False,
        init_lora_weights: bool | str = True,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for embedding layers (PEFT does not support it).")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        # PEFT applies no dropout to embedding adapters; keep the attribute for a uniform interface.
        self.dropout = nn.Identity()
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, device=device, dtype=dtype))
        with torch.no_grad():
            if init_lora_weights is False:
                nn.init.normal_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
            else:
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)

    def forward(self, ids: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
        # ids: (...) -> (..., dim)
        after_a = F.embedding(
            ids,
            self.lora_embedding_A.T,  # (vocab, r)
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )  # (..., r)
        return (after_a @ self.lora_embedding_B.T) * self.scaling  # (..., dim)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * (B @ A)^T`` (num_embeddings, dim) in fp32."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


class _LoraWrapper(nn.Module):
    """State shared by the wrappers: named adapters, which are active, merged, or disabled.

    ``active_adapters`` lists the adapters added in the forward; ``merged_adapters`` those folded into the base
    weight (skipped in the forward); ``disabled`` makes the forward return the base output alone.
    """

    adapter_type: type[nn.Module]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        #: The exact quantized base weight while adapters are merged into a 4/8-bit base (``quant.snapshot_weight``).
        self.exact_quantized_base: dict[str, Any] | None = None
        self.disabled = False
        #: Per-row adapter names of a mixed batch (``"__base__"``: none), set for one call by
        #: ``lorakit.variants.mixed.mixed_batch``; None runs the active adapters on every row.
        self.row_adapters: list[str] | None = None

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

    def _adapter_class(self, use_dora: bool) -> type[nn.Module]:
        raise NotImplementedError

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_bias: bool = False,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
    ) -> nn.Module:
        """Create adapter ``name`` on the base's device (fp32 over half-precision or quantized bases)."""
        device, dtype = self._base_device_dtype()
        adapter = self._adapter_class(use_dora)(
            *self._adapter_dims(), r, lora_alpha, lora_dropout, use_rslora, lora_bias, init_lora_weights,
            device=device, dtype=dtype,
        )
        self.adapters[name] = adapter
        if use_dora:
            adapter.init_magnitude(self)
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it.")
        if name in self.adapters:
            del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]
        from lorakit.variants.mixed import clear_mixed_caches

        # a kept mixed-batch stack would hold the deleted adapter's factors; the model's kept call (which holds it
        # too) is stale from now on and dropped by PeftModel.delete_adapter, or replaced at the next mixed call
        clear_mixed_caches(self)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # ---- merging (written once, on the delta) ------------------------------------------------------------
    def _base_weight_delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Bring a delta (out, in) to the layout of the base weight (overridden for (in, out) bases)."""
        return delta

    def _apply_delta(self, name: str, sign: float, safe_merge: bool) -> None:
        adapter = self.adapters[name]
        base = self.base_layer
        lora_b = getattr(adapter, "lora_B", None)
        if lora_b is not None and lora_b.bias is not None and base.bias is None:  # refuse before writing anything
            raise ValueError(f"adapter {name!r} has lora_bias but the base layer has no bias to merge it into.")
        if getattr(adapter, "wraps_base_output", False):  # DoRA: the delta depends on the base weight
            delta = self._base_weight_delta_layout(adapter.merge_delta(self.dora_weight_delta_layout(), sign, self))
        else:
            delta = self._base_weight_delta_layout(adapter.delta_weight()) * sign
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
        if lora_b is not None and lora_b.bias is not None:
            base.bias.data += (lora_b.bias.float() * adapter.scaling * sign).to(base.bias.dtype)

    def unmerged_weight(self) -> torch.Tensor:
        """A copy of the base weight in the layout of ``delta_weight()`` (fp32) with every merged adapter taken out
        again, newest first: the weight the forward sees while nothing is merged (DoRA's norm is taken on it)."""
        weight = self.dora_weight_delta_layout().clone()
        for name in reversed(self.merged_adapters):
            adapter = self.adapters[name]
            if getattr(adapter, "wraps_base_output", False):
                weight = adapter.before_merge(weight)
            else:
                weight -= adapter.delta_weight().to(weight)
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

    def _adapters_to_run(self) -> list[nn.Module]:
        if self.disabled:
            return []
        return [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters]

    def __getattr__(self, name: str) -> Any:
        # Attributes of the base layer (``weight``, ``in_features``, ``padding_idx`` ...) read through the
        # wrapper, so model code that inspects its layers keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def _has_hooks(module: nn.Module) -> bool:
    """Whether running ``module``'s computation without calling it would skip a hook: its own forward/backward
    hooks, an instance-level ``forward`` (accelerate's ``_hf_hook`` wrappers), or a global module hook."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    if "forward" in module.__dict__ or hasattr(module, "_hf_hook"):
        return True
    g = torch.nn.modules.module
    return bool(
        g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


class LoraLinear(_LoraWrapper):
    """LoRA around a linear-like base: ``nn.Linear``, GPT-2 ``Conv1D`` (``fan_in_fan_out``), or a quantized
    linear (lorakit's or bitsandbytes' 4-bit/8-bit)."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = fan_in_fan_out

    def _adapter_dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _adapter_class(self, use_dora: bool) -> type[nn.Module]:
        if use_dora:
            from lorakit.variants.dora import DoraLinearAdapter

            return DoraLinearAdapter
        return LoraAdapter

    def _base_weight_delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta  # Conv1D stores (in, out)

    def dora_weight(self) -> tuple[torch.Tensor, bool]:
        """The base weight as stored (dequantized for 4-bit/8-bit) and whether it is (in, out)."""
        if quant.is_quantized_linear(self.base_layer):
            return quant.dequantize_weight(self.base_layer), False
        return self.base_layer.weight, self.fan_in_fan_out

    def dora_weight_delta_layout(self) -> torch.Tensor:
        """The base weight (out, in) in fp32: the layout of ``delta_weight()``."""
        weight, transposed = self.dora_weight()
        return (weight.T if transposed else weight).float()

    #: The fused autograd (``lorakit.kernels.lora_fused``: dX = dY W + s (dY B) A in one accumulation, dB as
    #: (h^T dY)^T, no extra saved copies). ``None`` (default): in fp32/fp64 training wherever it computes what the
    #: plain path computes (``_fuses_by_default``); ``True`` (``PeftModel.enable_fused_lora``): wherever it applies,
    #: the adapter then running in the compute dtype (over half precision outputs differ by rounding); ``False``
    #: (``enable_fused_lora(False)``): never.
    use_fused: bool | None = None

    def _fused_weight(self, x: torch.Tensor) -> Any:
        """The frozen base weight (out, in) for the fused path, or a callable that dequantizes it on demand."""
        base = self.base_layer
        if isinstance(base, DequantLinearModule):  # dequantize in forward and backward, unsaved
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            return lambda: base.dequantize(dtype)
        return base.weight.T if self.fan_in_fan_out else base.weight

    def _fuses_by_default(self, x: torch.Tensor, adapter: nn.Module) -> bool:
        """Where the fused path computes what the plain path computes, value for value, so that switching between
        them changes nothing (reentrant checkpointing runs the forward without gradients, on the plain path, and
        recomputes it with them, on the fused one):

        - fp32/fp64 compute: x, the adapter and the base weight in one such dtype, no autocast (in half precision
          the fused additions round once where the plain path rounds twice);
        - a plain ``nn.Linear`` / GPT-2 ``Conv1D`` or a lorakit quantized base computing in x's dtype;
        - no hooks on the base (accelerate's offloading hooks live in its forward, which the fused path does not
          call; backward hooks and global module hooks would be skipped as well);
        - no ``torch.compile`` tracing, ``torch.func`` transform or forward-mode AD (the autograd function has no
          vmap or jvp rule). Gradients on: checked by ``forward`` first (inference keeps the plain path, whose
          per-call overhead is lower)."""
        base = self.base_layer
        dtype = x.dtype
        if dtype not in (torch.float32, torch.float64) or adapter.lora_A.weight.dtype != dtype:
            return False
        if isinstance(base, DequantLinearModule):
            if base.compute_dtype not in (None, dtype):
                return False
        elif not (type(base) is nn.Linear or type(base).__name__ == "Conv1D") or base.weight.dtype != dtype:
            return False
        if torch.is_autocast_enabled(x.device.type):  # (hooks on the base: checked by _can_fuse in every mode)
            return False
        return not (
            torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0
        )

    def _can_fuse(self, adapters: list[nn.Module], x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        if self.use_fused is False or args or kwargs or len(adapters) != 1:
            return False
        if not vars(type(adapters[0])).get("fusable", False):  # set per class: a subclass must opt in itself
            return False
        if self.use_fused is None and not self._fuses_by_default(x, adapters[0]):
            return False
        base = self.base_layer
        if _has_hooks(base):  # also when switched on: the fused path never calls base (accelerate's offload hooks)
            return False
        bias = getattr(base, "bias", None)
        weight = getattr(base, "weight", None)
        frozen = weight is not None and not weight.requires_grad and (bias is None or not bias.requires_grad)
        return frozen and (isinstance(base, DequantLinearModule) or weight.is_floating_point())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.row_adapters is None and (self.use_fused or (self.use_fused is None and torch.is_grad_enabled())):
            adapters = self._adapters_to_run()
            if self._can_fuse(adapters, x, args, kwargs):
                return adapters[0].fused_forward(x, self, self._fused_weight(x), self.training)
        if self.row_adapters is not None and not self.disabled:
            from lorakit.variants.mixed import mixed_linear_forward

            base = self._modules["base_layer"]
            if not args and not kwargs and type(base) is nn.Linear and not _has_hooks(base):
                # what calling it runs, minus nn.Module.__call__; the output is then ours alone, so the adapters may
                # be added into it in place (not under torch.func / forward AD, where the added term may be batched
                # or dual while the base output is not)
                plain = not (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0)
                return mixed_linear_forward(self, x, F.linear(x, base.weight, base.bias), own_result=plain)
            return mixed_linear_forward(self, x, base(x, *args, **kwargs))
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        for adapter in self._adapters_to_run():
            if adapter.wraps_base_output:  # DoRA rescales the base output
                result = adapter.forward_with_base(x, result, self)
            else:
                result = adapter.add_to(result, x)
        return result


class LoraEmbedding(_LoraWrapper):
    """LoRA around an ``nn.Embedding`` (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``)."""

    def _adapter_dims(self) -> tuple[int, int]:
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def _adapter_class(self, use_dora: bool) -> type[nn.Module]:
        if use_dora:
            from lorakit.variants.dora import DoraEmbeddingAdapter

            return DoraEmbeddingAdapter
        return LoraEmbeddingAdapter

    def dora_weight(self) -> tuple[torch.Tensor, bool]:
        """The weight (vocab, dim): the transpose of DoRA's (out=dim, in=vocab) orientation."""
        return self.base_layer.weight, True

    def dora_weight_delta_layout(self) -> torch.Tensor:
        """The weight (vocab, dim) in fp32: the layout of ``delta_weight()``."""
        return self.base_layer.weight.float()

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(ids, *args, **kwargs)  # (..., dim)
        if self.row_adapters is not None and not self.disabled:
            from lorakit.variants.mixed import mixed_embedding_forward

            return mixed_embedding_forward(self, ids, result)
        for adapter in self._adapters_to_run():
            if adapter.wraps_base_output:  # DoRA rescales the base output
                result = adapter.forward_with_base(ids, result, self)
            else:
                result = result + adapter(ids, self.base_layer).to(result.dtype)
        return result


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: one trainable copy per adapter in ``modules_to_save``; ``original_module`` is
    kept untouched and used when no adapter is active or adapters are disabled (PEFT's layout and keys)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        #: Per-row adapter names of a mixed batch, set for one call by ``lorakit.variants.mixed.mixed_batch``:
        #: row ``i`` goes through its adapter's copy (the original module for ``"__base__"`` or no copy).
        self.row_adapters: list[str] | None = None

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
        if self.row_adapters is not None and not self.disabled:
            from lorakit.variants.mixed import mixed_modules_to_save_forward

            return mixed_modules_to_save_forward(self, *args, **kwargs)
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)


LORA_WRAPPERS = (LoraLinear, LoraEmbedding)
