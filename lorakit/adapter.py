"""The adapter interface, plain LoRA's two adapters, and the ``(base kind, variant) -> class`` table.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): for a frozen base ``y = W x (+ b)`` with ``W`` (out, in),

    y = W x (+ b) + scaling * B (A dropout(x)),   A: (r, in), B: (out, r), scaling = alpha / r  (rsLoRA: / sqrt(r))

computed on activations: ``B @ A`` is never built in the forward, only by ``delta_weight()`` for merging.

An ``Adapter`` is one named adapter of one layer. Its methods are everything the rest of lorakit asks of it:
the wrappers (``apply``, ``fused_forward``, ``projection``), merging (``delta_weight``, ``merge_delta``,
``before_merge``, ``bias_delta``), files and hotswap (``named_tensors``, ``TENSOR_SUFFIXES``), mixed batches
(``stack_factors``, ``output_scale``) and initialisation (``reset_parameters``, ``after_init``). Nothing outside
an adapter's own module tests which variant it is. A variant is one class and one row of ``ADAPTER_CLASSES``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import AdapterSpec

#: Names an adapter may not take besides its tensors' names: attribute names inside wrappers, PEFT's markers.
_WRAPPER_NAMES = ("base_layer", "adapters", "modules_to_save", "original_module", "weight", "bias", "__base__")


class AdapterParameter(nn.Parameter):
    """An adapter tensor: an ``nn.Parameter`` that counts the accesses to its ``.data`` (``data_reads``).

    An in-place write through ``.data`` (``p.data.mul_(2)``) changes the values without bumping ``p._version``
    (``.data`` is a new tensor with its own version counter), so the version counter alone cannot tell a kept
    mixed-batch stack (``lorakit.variants.mixed.AdapterStack``) that the values changed; a changed ``data_reads``
    can (conservatively: a read counts too). Everything else is ``nn.Parameter``'s."""

    data_reads = 0

    @property
    def data(self) -> torch.Tensor:
        self.__dict__["data_reads"] = self.data_reads + 1
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        torch._C.TensorBase.data.__set__(self, value)


def data_reads(tensor: torch.Tensor) -> int | None:
    """How often ``tensor.data`` was read, for an ``AdapterParameter``; None for other tensors (not counted)."""
    return tensor.data_reads if isinstance(tensor, AdapterParameter) else None


def _empty_linear(
    in_features: int, out_features: int, bias: bool, device: torch.device | None, dtype: torch.dtype
) -> nn.Linear:
    """An ``nn.Linear`` with uninitialised storage. ``nn.Linear(...)`` runs its own random init, which the
    adapter's init overwrites at once; on models with thousands of targets (and on the meta device, where
    random init goes through slow decompositions) that wasted init dominated injection time."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = AdapterParameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    linear.bias = AdapterParameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
    return linear


class Adapter(nn.Module):
    """One named adapter of one layer. Subclasses implement ``factors``, ``apply`` and ``reset_parameters``; the
    other methods have plain LoRA's meaning and are overridden by variants that differ.

    ``wrapper`` arguments are the ``LoraLinear`` / ``LoraEmbedding`` holding the adapter; they give the base layer
    (``wrapper.base_layer``) and its weight (``wrapper.base_weight()``: as stored, and whether it is (in, out);
    ``wrapper.base_weight_fp32()``: (out, in) fp32, the layout of ``delta_weight()``).
    """

    #: ``(file-key suffix, rank dimension or -1)`` of each tensor this class may hold (PEFT's keys).
    TENSOR_SUFFIXES: ClassVar[tuple[tuple[str, int], ...]] = ()

    def __init__(self, spec: AdapterSpec) -> None:
        super().__init__()
        self.r = spec.r
        self.lora_alpha = spec.lora_alpha
        self.scaling = spec.scaling

    # ---- the tensors ----------------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in), B (out, r))`` in PEFT's orientation (embeddings: in = vocab, out = dim)."""
        raise NotImplementedError

    def named_tensors(self) -> list[tuple[str, torch.Tensor, int]]:
        """``(file-key suffix, parameter, rank dimension or -1)`` of every tensor of this adapter: the one list that
        io, hotswap and mixed-batch stacks read."""
        return [(s, self.get_parameter(s), d) for s, d in self.TENSOR_SUFFIXES if _has_parameter(self, s)]

    @property
    def dtype(self) -> torch.dtype:
        return self.factors()[0].dtype

    # ---- forward --------------------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        """The layer's output with this adapter, from its input ``x`` and the base output ``result``."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor, wrapper: nn.Module, weight: Any, training: bool) -> torch.Tensor | None:
        """The layer's whole output through a fused autograd (``lorakit.kernels.lora_fused``), or None if this
        adapter has none. ``weight``: the frozen base weight (out, in), or a callable dequantizing it."""
        return None

    def projection(self, weight: Any, bias: torch.Tensor | None) -> Any:
        """This adapter as one projection of the fused SwiGLU MLP (``LoraProjection``), or None if it cannot be."""
        return None

    # ---- merging --------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out, in) in fp32 (embeddings: (vocab, dim))."""
        raise NotImplementedError

    def merge_delta(self, wrapper: nn.Module, sign: float) -> torch.Tensor:
        """Signed change of the base weight (layout of ``delta_weight``, fp32) for merging (sign > 0) or
        unmerging (sign < 0)."""
        return self.delta_weight() * sign

    def before_merge(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (layout of ``delta_weight``, fp32) as it was before this adapter was merged into it."""
        return weight - self.delta_weight().to(weight)

    def bias_delta(self) -> torch.Tensor | None:
        """What merging adds to the base bias (out,), or None."""
        return None

    # ---- mixed batches --------------------------------------------------------------------------------------
    def stack_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A (r, in), scaling * B (out, r), scaling * bias (out,) or None)``: what a mixed batch stacks (in the
        autograd graph when gradients are on)."""
        a, b = self.factors()
        return a, b * self.scaling, None

    def output_scale(self, wrapper: nn.Module) -> torch.Tensor | None:
        """A per-output factor ``g`` (out,) a mixed batch applies as ``(result - b + lora) * g + b``, or None."""
        return None

    # ---- initialisation -------------------------------------------------------------------------------------
    def reset_parameters(self, init_lora_weights: bool | str) -> None:
        raise NotImplementedError

    def after_init(self, wrapper: nn.Module) -> None:
        """Called once the factors hold their initial values (after ``reset_parameters`` and after an
        ``INITS`` method, which may also change the base weight)."""


def _has_parameter(module: nn.Module, target: str) -> bool:
    owner_path, _, name = target.rpartition(".")
    owner = module._modules.get(owner_path) if owner_path else module
    return owner is not None and owner._parameters.get(name) is not None


def _linear_input(adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
    """Under autocast the matmuls run in the autocast dtype; otherwise x is brought to the adapter's own dtype (no
    copy when the dtypes already agree)."""
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != adapter.lora_A.weight.dtype:
        return x.to(adapter.lora_A.weight.dtype)
    return x


def dropout_p(adapter: nn.Module) -> float:
    """The adapter's dropout probability (0 without dropout)."""
    return adapter.dropout.p if isinstance(adapter.dropout, nn.Dropout) else 0.0


class LoraAdapter(Adapter):
    """One named adapter of a linear layer: ``scaling * lora_B(lora_A(dropout(x)))``.

    Shapes: ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), ``lora_B.bias`` (out) with ``lora_bias``.
    """

    TENSOR_SUFFIXES = (("lora_A.weight", 0), ("lora_B.weight", 1), ("lora_B.bias", -1))

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: AdapterSpec,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(spec)
        self.dropout = nn.Dropout(spec.lora_dropout) if spec.lora_dropout > 0 else nn.Identity()
        self.lora_A = _empty_linear(in_features, spec.r, False, device, dtype)
        self.lora_B = _empty_linear(spec.r, out_features, spec.lora_bias, device, dtype)
        if self.lora_A.weight.device.type != "meta":  # meta tensors hold no values to initialise
            self.reset_parameters(spec.init_lora_weights)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

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
        # x: (..., in) -> (..., out)
        return self.lora_B(self.lora_A(self.dropout(_linear_input(self, x)))) * self.scaling

    def apply(self, x: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        """``result + scaling * B(A(dropout(x)))`` with the scaling folded into one fused add (one full-size
        temporary and one elementwise pass fewer than ``result + forward(x)``)."""
        h = self.lora_B(self.lora_A(self.dropout(_linear_input(self, x))))  # (..., out)
        return torch.add(result, h.to(result.dtype), alpha=self.scaling)

    def _computes_plain_lora(self) -> bool:
        """The fused kernels compute ``LoraAdapter.apply``: a subclass whose ``apply`` differs gets the plain path
        unless it brings its own fused form (as DoRA does)."""
        return type(self).apply is LoraAdapter.apply

    def fused_forward(self, x: torch.Tensor, wrapper: nn.Module, weight: Any, training: bool) -> torch.Tensor | None:
        """``lorakit.kernels.lora_fused.lora_linear``: dX = dY W + s (dY B) A in one accumulation, dB as
        (h^T dY)^T, no extra saved copies."""
        if not self._computes_plain_lora():
            return None
        from lorakit.kernels.lora_fused import lora_linear

        return lora_linear(
            x, weight, wrapper.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            dropout_p(self), training, self.lora_B.bias,
        )

    def projection(self, weight: Any, bias: torch.Tensor | None) -> Any:
        if not self._computes_plain_lora():
            return None
        from lorakit.kernels.lora_fused import LoraProjection

        return LoraProjection(
            weight, bias, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout_p(self), self.lora_B.bias
        )

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out, in), in fp32 (the one place the full delta is built: merging)."""
        a = self.lora_A.weight.float()  # (r, in)
        b = self.lora_B.weight.float()  # (out, r)
        return (b @ a) * self.scaling

    def bias_delta(self) -> torch.Tensor | None:
        bias = self.lora_B.bias
        return None if bias is None else bias.float() * self.scaling

    def stack_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bias = self.lora_B.bias
        return self.lora_A.weight, self.lora_B.weight * self.scaling, None if bias is None else bias * self.scaling


class LoraEmbeddingAdapter(Adapter):
    """One named adapter of an embedding: ``scaling * embed(ids, A^T) @ B^T``.

    Shapes (PEFT's keys): ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (embedding_dim, r).
    Default init is the reverse of the linear case (A = 0, B normal), as in PEFT and loralib.
    """

    TENSOR_SUFFIXES = (("lora_embedding_A", 0), ("lora_embedding_B", 1))

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        spec: AdapterSpec,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(spec)
        if spec.lora_bias:
            raise ValueError("lora_bias=True is not supported for embedding layers (PEFT does not support it).")
        # PEFT applies no dropout to embedding adapters; keep the attribute for a uniform interface.
        self.dropout = nn.Identity()
        self.lora_embedding_A = AdapterParameter(torch.empty(spec.r, num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = AdapterParameter(torch.empty(embedding_dim, spec.r, device=device, dtype=dtype))
        self.reset_parameters(spec.init_lora_weights)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def reset_parameters(self, init_lora_weights: bool | str) -> None:
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

    def apply(self, ids: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        return result + self(ids, wrapper.base_layer).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * (B @ A)^T`` (num_embeddings, dim) in fp32."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling


# ---- the table ----------------------------------------------------------------------------------------------
#: ``(base kind, variant) -> adapter class`` (or ``"module:Class"``, imported on first use). Base kinds: "linear"
#: (``LoraLinear``), "embedding" (``LoraEmbedding``); the variant comes from ``AdapterSpec.variant``.
ADAPTER_CLASSES: dict[tuple[str, str], type[Adapter] | str] = {
    ("linear", "lora"): LoraAdapter,
    ("embedding", "lora"): LoraEmbeddingAdapter,
    ("linear", "dora"): "lorakit.variants.dora:DoraLinearAdapter",
    ("embedding", "dora"): "lorakit.variants.dora:DoraEmbeddingAdapter",
}


def _resolve(entry: type[Adapter] | str) -> type[Adapter]:
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        return getattr(importlib.import_module(module), name)
    return entry


def adapter_class(kind: str, variant: str) -> type[Adapter]:
    """The adapter class of a ``kind`` base ("linear", "embedding") and ``variant``."""
    entry = ADAPTER_CLASSES.get((kind, variant))
    if entry is None:
        known = sorted(v for k, v in ADAPTER_CLASSES if k == kind)
        raise NotImplementedError(
            f"adapter variant {variant!r} on a {kind} layer is not implemented in lorakit; available: {known}."
        )
    return _resolve(entry)


def tensor_suffixes() -> frozenset[str]:
    """The file-key suffixes of every registered adapter class (PEFT's part names: ``lora_A.weight``, ...)."""
    return frozenset(s for entry in ADAPTER_CLASSES.values() for s, _ in _resolve(entry).TENSOR_SUFFIXES)


def reserved_names() -> frozenset[str]:
    """Names an adapter may not take: wrapper attributes, PEFT's markers, and every adapter tensor's first name
    part (``lora_A``, ``lora_magnitude_vector``, ...)."""
    return frozenset(_WRAPPER_NAMES) | {s.split(".")[0] for s in tensor_suffixes()}
