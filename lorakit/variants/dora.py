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

The magnitude is saved under PEFT's file key ``<path>.lora_magnitude_vector`` (an ``nn.Parameter`` of that name
on the adapter module).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.layers import LoraAdapter, LoraEmbeddingAdapter


def dora_row_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, transposed: bool
) -> torch.Tensor:
    """``||W + scaling * B @ A||`` of each output row (out,), detached, in ``lora_A``'s dtype.

    ``weight`` is ``W`` (out, in), or (in, out) when ``transposed`` (GPT-2 Conv1D, embeddings); ``lora_A`` (r, in),
    ``lora_B`` (out, r). Never builds ``B @ A``.
    """
    with torch.no_grad():
        dtype = lora_A.dtype
        w = weight.to(dtype)
        a, b = lora_A.detach(), lora_B.detach()
        if transposed:
            wa = (a @ w).T  # (out, r)
            w_sq = (w * w).sum(dim=0)  # (out,)
        else:
            wa = w @ a.T  # (out, r)
            w_sq = (w * w).sum(dim=1)  # (out,)
        cross = (wa * b).sum(dim=1)  # (out,)
        ba_sq = ((b @ (a @ a.T)) * b).sum(dim=1)  # (out,)
        return (w_sq + 2 * scaling * cross + scaling * scaling * ba_sq).clamp_min(0).sqrt()


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


class DoraLinearAdapter(LoraAdapter):
    """A LoRA adapter with DoRA's magnitude ``lora_magnitude_vector`` (out,); see the module docstring."""

    wraps_base_output = True

    def __init__(self, in_features: int, out_features: int, *args, **kwargs) -> None:
        super().__init__(in_features, out_features, *args, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(out_features, device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        )
        self._merged_norm: torch.Tensor | None = None

    def row_norm(self, wrapper: nn.Module) -> torch.Tensor:
        weight, transposed = wrapper.dora_weight()
        return dora_row_norm(weight, self.lora_A.weight, self.lora_B.weight, self.scaling, transposed)

    def init_magnitude(self, wrapper: nn.Module) -> None:
        """``m = ||W + s B A||_c`` so that the adapted layer starts equal to LoRA's (PEFT's init)."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.row_norm(wrapper))

    def forward_with_base(self, x: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        """``g * (result - b + s B A d(x)) + b`` with ``result = W x + b`` (..., out) from the base layer."""
        g = self.lora_magnitude_vector / self.row_norm(wrapper)  # (out,); the norm is a constant (detached)
        lora = self(x).to(result.dtype)  # (..., out) = s B A d(x)
        bias = getattr(wrapper.base_layer, "bias", None)
        if bias is None:
            return (result + lora) * g.to(result.dtype)
        bias = bias.to(result.dtype)
        return (result - bias + lora) * g.to(result.dtype) + bias

    def merge_delta(self, weight: torch.Tensor, sign: float, wrapper: nn.Module) -> torch.Tensor:
        """Signed change of ``weight`` (out, in) for merging (sign > 0) or unmerging (sign < 0)."""
        if sign > 0:
            self._merged_norm = self.row_norm(wrapper).float()
        elif self._merged_norm is None:
            raise RuntimeError("DoRA unmerge without a merge: the weight norm of the merge is unknown.")
        norm = self._merged_norm
        if sign < 0:
            self._merged_norm = None
        return _merge_delta(self, weight, self.delta_weight(), norm, sign, row_dim=1)


class DoraEmbeddingAdapter(LoraEmbeddingAdapter):
    """An embedding adapter with DoRA's magnitude ``lora_magnitude_vector`` (dim,)."""

    wraps_base_output = True

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(embedding_dim, device=self.lora_embedding_A.device, dtype=self.lora_embedding_A.dtype)
        )
        self._merged_norm: torch.Tensor | None = None

    def row_norm(self, wrapper: nn.Module) -> torch.Tensor:
        weight, transposed = wrapper.dora_weight()
        return dora_row_norm(weight, self.lora_embedding_A, self.lora_embedding_B, self.scaling, transposed)

    def init_magnitude(self, wrapper: nn.Module) -> None:
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.row_norm(wrapper))

    def forward_with_base(self, ids: torch.Tensor, result: torch.Tensor, wrapper: nn.Module) -> torch.Tensor:
        """``g * (result + s embed(ids, A^T) B^T)`` (..., dim)."""
        g = self.lora_magnitude_vector / self.row_norm(wrapper)  # (dim,)
        lora = self(ids, wrapper.base_layer).to(result.dtype)  # (..., dim)
        return (result + lora) * g.to(result.dtype)

    def merge_delta(self, weight: torch.Tensor, sign: float, wrapper: nn.Module) -> torch.Tensor:
        """Signed change of the embedding weight (vocab, dim)."""
        if sign > 0:
            self._merged_norm = self.row_norm(wrapper).float()
        elif self._merged_norm is None:
            raise RuntimeError("DoRA unmerge without a merge: the weight norm of the merge is unknown.")
        norm = self._merged_norm
        if sign < 0:
            self._merged_norm = None
        return _merge_delta(self, weight, self.delta_weight(), norm, sign, row_dim=0)
