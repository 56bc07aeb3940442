"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is split into a magnitude ``m`` (out,) and a direction:

    W' = m * (W + s B A) / ||W + s B A||_c          ||.||_c: the L2 norm of each output row, (out,)

so with ``g = m / ||W + s B A||_c`` (out,) and the base output ``z = W x``:

    y = W' x + b = g * (W x + s B A x) + b = g * (z + s B A x) + b

computed on activations from the base layer's own output ``z + b`` (no second base matmul). The norm is
treated as a constant in backward (paper, section 4.3: "we suggest treating ||V + dV||_c as a constant,
thereby detaching it from the gradient graph"), so it is computed under ``no_grad``, and without building
``B A`` or running an identity matrix through the adapter (PEFT does both):

    ||W_o + s (B A)_o||^2 = ||W_o||^2 + 2 s <(W A^T)_o, B_o> + s^2 B_o (A A^T) B_o^T       for each row o

which costs one (out, in) x (in, r) matmul and no (out, in) temporary beyond ``W`` itself.

Dropout. PEFT, in training with dropout, computes ``y = z + b + (g - 1) * W d(x) + g * s B A d(x)``: it runs
the base matmul a second time on the dropped input ``d(x)``. Here the adapter sees ``d(x)`` and the base term
uses ``z`` from the un-dropped ``x``:

    y = g * (z + s B A d(x)) + b

Dropout is unbiased (``E[d(x)] = x``), so both have the same expectation ``g * (z + s B A x) + b``, and they are
identical whenever dropout is inactive (p = 0 or eval mode), where parity with PEFT is tested.

Embedding (PEFT's orientation): the weight ``(vocab, dim)`` is the transpose of ``(out=dim, in=vocab)`` and the
delta is ``s (B A)^T`` with ``A = lora_embedding_A`` (r, vocab), ``B = lora_embedding_B`` (dim, r), so the
same row-norm formula applies with the weight read transposed; ``m`` is (dim,). Embeddings have no dropout.

Training. Where the fused LoRA autograd runs (``LoraLinear.use_fused``: one active adapter over a frozen base, by
default in fp32/fp64), a DoRA linear runs ``lorakit.kernels.lora_fused.dora_linear``: the same formula with the
base GEMM accumulating into the adapter's output and, in backward, into the adapter's dX (no separate (M, out)
adapter output or (M, in) dX to add), the rank-r products on ``rank_matmul``.

The magnitude is saved under PEFT's file key ``<path>.lora_magnitude_vector`` (an ``nn.Parameter`` of that name
on the adapter module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapter import AdapterParameter, LoraAdapter, LoraEmbeddingAdapter, dropout_p


def dora_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    transposed: bool,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||W + scaling * B @ A||`` of each output row (out,), detached, in ``lora_A``'s dtype.

    ``weight`` is ``W`` (out, in), or (in, out) when ``transposed`` (GPT-2 Conv1D, embeddings); ``lora_A`` (r, in),
    ``lora_B`` (out, r). ``weight_sq``: ``||W_o||^2`` (out,) when the caller has it cached (frozen ``W``). Never
    builds ``B @ A``.
    """
    with torch.no_grad():
        dtype = lora_A.dtype
        w = weight.to(dtype)
        a, b = lora_A.detach(), lora_B.detach()
        wa = (a @ w).T if transposed else w @ a.T  # (out, r)
        if weight_sq is None:
            weight_sq = weight_row_sq(w, transposed)
        cross = (wa * b).sum(dim=1)  # (out,)
        ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # (out,)
        return (weight_sq.to(dtype) + 2 * scaling * cross + scaling * scaling * ba_sq).clamp_min(0).sqrt()


def weight_row_sq(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``||W_o||^2`` for each output row (out,) of ``W`` (out, in), or of ``W^T`` when ``transposed``."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, dim=0 if transposed else 1).square()


class _RowSqCache:
    """``||W_o||^2`` of a frozen base weight, recomputed only when the weight changes.

    The key is the tensor's storage pointer, version counter and shape: an in-place write through autograd-visible
    ops (``copy_`` under ``no_grad``, ``load_state_dict``, merging) bumps the version. Writes through ``.data`` do
    not, so lorakit's own weight writes go through the parameter itself. A dequantized weight (4-bit/8-bit base) is
    a fresh tensor on each call and is never cached.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, transposed: bool, cacheable: bool) -> torch.Tensor | None:
        if not cacheable:
            return None
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, transposed)
        if key != self.key:
            self.key, self.value = key, weight_row_sq(weight.float(), transposed)
        return self.value


def _dora_weight(adapter: nn.Module, wrapper: nn.Module) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """The base weight, whether it is (in, out), and its cached ``||W_o||^2`` (None for quantized bases)."""
    weight, transposed = wrapper.base_weight()
    frozen = weight is getattr(wrapper.base_layer, "weight", None) and not weight.requires_grad
    return weight, transposed, adapter._row_sq.get(weight, transposed, frozen)


def _merge_delta(
    adapter: nn.Module, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor, sign: float, row_dim: int
) -> torch.Tensor:
    """Signed change of the base weight when (un)merging DoRA; all tensors in the base weight's layout.

    merge:   W' = g * (W + dW)          -> returns W' - W
    unmerge: W  = W' / g - dW           -> returns W - W'   (g from the norm stored at merge time)
    """
    g = (adapter.lora_magnitude_vector.detach().float() / norm.float()).unsqueeze(row_dim)  # broadcast over in
    w = weight.float()
    if sign > 0:
        return g * (w + delta) - w
    return w / g - delta - w


def _signed_merge_delta(adapter: nn.Module, wrapper: nn.Module, sign: float, row_dim: int) -> torch.Tensor:
    """Merging (sign > 0) records the weight norm it used; unmerging (sign < 0) needs that same norm back.

    The norm is the forward's, ``||W + s B A||_c`` of the un-merged base weight ``W``: when other adapters are
    merged already, it is taken on the weight with them taken out (``wrapper.unmerged_weight()``, a copy), as
    PEFT does (``row_norm``); on the merged weight the merged model would differ from the unmerged one."""
    if sign > 0:
        adapter._merged_norm = adapter.row_norm(wrapper).float()
    elif adapter._merged_norm is None:
        raise RuntimeError("DoRA unmerge without a merge: the weight norm of the merge is unknown.")
    norm = adapter._merged_norm
    if sign < 0:
        adapter._merged_norm = None
    weight = wrapper.base_weight_fp32()  # (out, in) / (vocab, dim)
    return _merge_delta(adapter, weight, adapter.delta_weight(), norm, sign, row_dim=row_dim)


def _before_merge(adapter: nn.Module, weight: torch.Tensor, row_dim: int) -> torch.Tensor:
    """The weight (delta layout, fp32) as it was before ``adapter`` was merged into it (its stored norm kept)."""
    return weight + _merge_delta(adapter, weight, adapter.delta_weight(), adapter._merged_norm, -1.0, row_dim)


class DoraLinearAdapter(LoraAdapter):
    """A LoRA adapter with DoRA's magnitude ``lora_magnitude_vector`` (out,); see the module docstring."""

    TENSOR_SUFFIXES = (*LoraAdapter.TENSOR_SUFFIXES, ("lora_magnitude_vector", -1))

    def __init__(self, in_features: int, out_features: int, *args, **kwargs) -> None:
        super().__init__(in_features, out_features, *args, **kwargs)
        self.lora_magnitude_vector = AdapterParameter(
            torch.ones(out_features, device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        )
        self._merged_norm: torch.Tensor | None = None
        self._row_sq = _RowSqCache()

    def row_norm(self, wrapper: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s B A||_c`` (out,) of the base weight, or of ``weight`` (out, in) when given. While other
        adapters are merged into the base, ``W`` is the weight with them taken out (``unmerged_weight``, a copy
        per call): the norm is always the un-merged base's, so merging an adapter that runs before this one
        changes nothing (PEFT takes it on the merged weight in the forward)."""
        if weight is None and wrapper.merged_adapters:
            weight = wrapper.unmerged_weight()
        if weight is not None:
            return dora_row_norm(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, False)
        weight, transposed, weight_sq = _dora_weight(self, wrapper)
        return dora_row_norm(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, transposed, weight_sq)

    def init_magnitude(self, wrapper: nn.Module) -> None:
        """``m = ||W + s B A||_c`` so that the adapted layer starts equal to LoRA's (PEFT's init)."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.row_norm(wrapper))

    after_init = init_magnitude

    def magnitude_scale(self, wrapper: nn.Module) -> torch.Tensor:
        """``g = m / ||W + s B A||_c`` (out,): differentiable in ``m``, the norm a constant (detached)."""
        return self.lora_magnitude_vector / self.row_norm(wrapper)

    output_scale = magnitude_scale

    def projection(self, weight: Any, bias: torch.Tensor | None) -> Any:
        return None  # the fused SwiGLU MLP has no magnitude term

    def fused_forward(self, x: torch.Tensor, wrapper: nn.Module, weight: Any, training: bool) -> torch.Tensor:
        """``g * (x W^T + s B A d(x)) + b`` through ``lorakit.kernels.lora_fused.dora_linear`` (see
        ``LoraAdapter.fused_forward``)."""
        from lorakit.kernels.lora_fused import dora_linear

        return dora_linear(
            x, weight, wrapper.base_layer.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
            self.magnitude_scale(wrapper), dropout_p(self), training, self.lora_B.bias,
        )

    def apply(self, x: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        """``g * (result - b + s B A d(x)) + b`` with ``result = W x + b`` (..., out) from the base layer.

        Written as one matmul and one fused elementwise op on (..., out) tensors: ``g`` and ``s`` are folded into
        ``B`` (an (out, r) product) and ``(1 - g) b`` into that matmul's bias,

            y = addcmul(A d(x) (s g B)^T + (1 - g) b,  result, g)

        which has the same value and the same gradients for A, B and ``m`` as the formula above.
        """
        g = self.magnitude_scale(wrapper)  # (out,)
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        b_scaled = self.lora_B.weight * (self.scaling * g).unsqueeze(1)  # (out, r)
        bias = getattr(wrapper.base_layer, "bias", None)
        lora_bias = self.lora_B.bias * (self.scaling * g) if self.lora_B.bias is not None else None
        if bias is not None:
            shift = (1 - g) * bias.to(g.dtype)  # (out,)
            lora_bias = shift if lora_bias is None else lora_bias + shift
        h = F.linear(self.lora_A(self.dropout(x)), b_scaled, lora_bias)  # (..., out)
        return torch.addcmul(h.to(result.dtype), result, g.to(result.dtype))

    def merge_delta(self, wrapper: nn.Module, sign: float) -> torch.Tensor:
        """Signed change of the base weight (out, in) for merging (sign > 0) or unmerging (sign < 0)."""
        return _signed_merge_delta(self, wrapper, sign, row_dim=1)

    def before_merge(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in) as it was before this adapter was merged into it."""
        return _before_merge(self, weight, row_dim=1)


class DoraEmbeddingAdapter(LoraEmbeddingAdapter):
    """An embedding adapter with DoRA's magnitude ``lora_magnitude_vector`` (dim,)."""

    TENSOR_SUFFIXES = (*LoraEmbeddingAdapter.TENSOR_SUFFIXES, ("lora_magnitude_vector", -1))

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.lora_magnitude_vector = AdapterParameter(
            torch.ones(embedding_dim, device=self.lora_embedding_A.device, dtype=self.lora_embedding_A.dtype)
        )
        self._merged_norm: torch.Tensor | None = None
        self._row_sq = _RowSqCache()

    def row_norm(self, wrapper: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``||W + s B A||_c`` (dim,) of the embedding weight, or of ``weight`` (vocab, dim) when given; the
        un-merged weight while other adapters are merged (see ``DoraLinearAdapter.row_norm``)."""
        if weight is None and wrapper.merged_adapters:
            weight = wrapper.unmerged_weight()
        if weight is not None:
            return dora_row_norm(weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling, True)
        weight, transposed, weight_sq = _dora_weight(self, wrapper)
        return dora_row_norm(
            weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling, transposed, weight_sq
        )

    def init_magnitude(self, wrapper: nn.Module) -> None:
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.row_norm(wrapper))

    after_init = init_magnitude

    def output_scale(self, wrapper: nn.Module) -> torch.Tensor:
        """``g = m / ||W + s B A||_c`` (dim,)."""
        return self.lora_magnitude_vector / self.row_norm(wrapper)

    def apply(self, ids: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        """``g * (result + s embed(ids, A^T) B^T)`` (..., dim)."""
        g = self.output_scale(wrapper)  # (dim,)
        lora = self(ids, wrapper.base_layer).to(result.dtype)  # (..., dim)
        return (result + lora) * g.to(result.dtype)

    def merge_delta(self, wrapper: nn.Module, sign: float) -> torch.Tensor:
        """Signed change of the embedding weight (vocab, dim)."""
        return _signed_merge_delta(self, wrapper, sign, row_dim=0)

    def before_merge(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (vocab, dim) as it was before this adapter was merged into it."""
        return _before_merge(self, weight, row_dim=0)
