"""Chunked LM-head + cross-entropy loss that never materializes the full (N, V) logits.

For a causal LM the loss is

    z = softcap(h W^T + b)                        # (N, V), softcap(l) = c * tanh(l / c) when a cap c is set
    loss_i = logsumexp(z_i) - z_i[y_i]            # (N,), rows with y_i == ignore_index contribute 0
    loss = sum_i loss_i          (reduction="sum")   or   sum_i loss_i / #{i : y_i != ignore_index}  ("mean")

and its gradient with respect to the logits is ``dz_i = softmax(z_i) - onehot(y_i)`` (times 1 / n_valid for
"mean"), chained through the softcap by ``dl = dz * (1 - (z / c)^2)``; then ``dh = dl W``, ``dW = dl^T h``,
``db = sum_i dl_i``.

Because the loss is a scalar, all gradients are computed in the forward, chunk by chunk of rows, and only
scaled by the incoming scalar gradient in the backward (the approach of Liger Kernel's fused linear
cross-entropy, https://arxiv.org/abs/2410.10989). Peak extra memory is one (chunk, V) fp32 block instead of
the (N, V) logits, their fp32 copy and the softmax that ``F.cross_entropy`` on full logits keeps. With a
frozen LM head (LoRA) only ``dh`` (N, H) is stored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = ("sum", "mean")
# Target size of one fp32 logits block: 2**25 elements = 128 MiB; with a 128K vocabulary that is 256 rows,
# still a matmul large enough to run near peak on a GPU.
_AUTO_CHUNK_ELEMENTS = 2**25


def _check_args(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    reduction: str,
    logit_softcap: float | None,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head_weight must be (V, H={hidden.shape[1]}), got shape {tuple(lm_head_weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be (N={hidden.shape[0]},), got shape {tuple(labels.shape)}")
    if lm_head_bias is not None and lm_head_bias.shape != (lm_head_weight.shape[0],):
        raise ValueError(f"lm_head_bias must be (V={lm_head_weight.shape[0]},), got shape {tuple(lm_head_bias.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be None or > 0, got {logit_softcap!r}")


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 (chunk, V) block holds about 2**25 elements (a power of two, >= 1)."""
    rows = max(1, _AUTO_CHUNK_ELEMENTS // max(1, vocab_size))
    return 1 << (rows.bit_length() - 1)


def lm_loss_reference(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """The plain computation ``chunked_lm_loss`` must match: full logits, fp32, ``F.cross_entropy``."""
    _check_args(hidden, lm_head_weight, labels, lm_head_bias, reduction, logit_softcap)
    logits = F.linear(hidden, lm_head_weight, lm_head_bias).float()  # (N, V)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,)
        chunk_size: int,
        ignore_index: int,
        reduction: str,
        logit_softcap: float | None,
        grad_enabled: bool,
    ) -> torch.Tensor:
        need_dh, need_dw = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        need_db = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        n_rows = hidden.shape[0]
        valid = labels != ignore_index  # (N,)
        n_valid = valid.sum()
        # "mean" over zero valid rows is 0/0 = nan, as in F.cross_entropy.
        denom = n_valid.float() if reduction == "mean" else torch.ones((), device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_db else None
        for start in range(0, n_rows, chunk_size):
            h = hidden[start : start + chunk_size]  # (c, H)
            y = labels[start : start + chunk_size]  # (c,)
            ok = valid[start : start + chunk_size]  # (c,)
            z = F.linear(h, weight, bias).float()  # (c, V) fp32
            if logit_softcap is not None:
                z = torch.tanh(z / logit_softcap).mul_(logit_softcap)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            safe_y = torch.where(ok, y, torch.zeros_like(y))  # (c,)
            target = z.gather(1, safe_y[:, None]).squeeze(1)  # (c,)
            total += torch.where(ok, lse - target, torch.zeros_like(lse)).sum()
            if not (need_dh or need_dw or need_db):
                continue
            # dz = (softmax(z) - onehot(y)) / denom on valid rows, 0 elsewhere; reuse z's storage.
            if logit_softcap is not None:
                dsoftcap = 1.0 - (z / logit_softcap).square_()  # (c, V)
            dz = z.sub_(lse[:, None]).exp_()  # (c, V) softmax
            dz[torch.arange(dz.shape[0], device=dz.device), safe_y] -= 1.0
            dz.mul_((ok.float() / denom)[:, None])
            if logit_softcap is not None:
                dz.mul_(dsoftcap)
                del dsoftcap
            dz_c = dz.to(hidden.dtype)  # (c, V) in the compute dtype, as autograd through F.linear would be
            if dh is not None:
                dh[start : start + chunk_size] = dz_c @ weight  # (c, H)
            if dw is not None:
                dw.addmm_(dz.t(), h.float())  # (V, H), fp32 accumulation over chunks
            if db is not None:
                db += dz.sum(0)
        ctx.save_for_backward(
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
        )
        return total / denom

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dw, db = ctx.saved_tensors
        grads = [g * grad_out.to(g.dtype) if g is not None else None for g in (dh, dw, db)]
        return (*grads, None, None, None, None, None, None)


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``softcap(hidden @ lm_head_weight^T + lm_head_bias)`` against ``labels``, in chunks.

    Args:
        hidden: (N, H) final hidden states (already normed), any float dtype.
        lm_head_weight: (V, H) output projection; it gets a gradient only if it requires one.
        labels: (N,) int64 targets, ``ignore_index`` where no loss is taken. Already shifted for a causal LM
            (see ``causal_lm_loss``).
        lm_head_bias: optional (V,) bias.
        chunk_size: rows per chunk; ``None`` picks ``auto_chunk_size(V)`` (about 128 MiB of fp32 logits).
        ignore_index: label value that contributes nothing.
        reduction: "sum" or "mean" (over non-ignored rows).
        logit_softcap: Gemma-2 style cap c: logits -> c * tanh(logits / c). ``None`` for no cap.

    Returns:
        A 0-dim fp32 tensor, equal to ``lm_loss_reference`` with the same arguments. The log-sum-exp and
        softmax run in fp32 whatever the input dtype.
    """
    _check_args(hidden, lm_head_weight, labels, lm_head_bias, reduction, logit_softcap)
    if chunk_size is None:
        chunk_size = auto_chunk_size(lm_head_weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return _ChunkedLMLoss.apply(
        hidden,
        lm_head_weight,
        lm_head_bias,
        labels,
        chunk_size,
        ignore_index,
        reduction,
        logit_softcap,
        torch.is_grad_enabled(),
    )


def causal_lm_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a transformers causal LM up to its final hidden states (no logits) and shift the labels.

    Calls the decoder stack ``model.get_decoder()`` (``LlamaModel`` inside ``LlamaForCausalLM``) with
    ``input_ids`` and ``model_kwargs`` (``attention_mask``, ``position_ids``, ...), exactly as the causal-LM
    forward would before its LM head. A lorakit/PEFT wrapper is unwrapped with ``get_base_model()``. The
    labels are shifted the way transformers' ``ForCausalLMLoss`` does: position t predicts token t+1, the last
    position gets ``ignore_index``.

    Returns:
        hidden: (B*T, H) final hidden states; labels: (B*T,) shifted labels.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder"):
        raise ValueError(f"{type(base).__name__} has no get_decoder(): not a transformers causal LM")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    out = base.get_decoder()(input_ids=input_ids, use_cache=False, **model_kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, H)
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T)
    return hidden.reshape(-1, hidden.shape[-1]), shifted.reshape(-1)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> torch.Tensor:
    """The causal-LM training loss of ``model(input_ids, labels=labels).loss`` without full logits.

    ``causal_lm_hidden_states`` then ``chunked_lm_loss`` with the model's LM head
    (``get_output_embeddings()``, a plain ``nn.Linear``) and its ``config.final_logit_softcapping``
    (Gemma-2). Models that scale logits in other ways (``logit_scale``, ``logits_scaling``) and LM heads
    carrying a LoRA adapter raise NotImplementedError.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, 1.0) not in (None, 1.0):
            raise NotImplementedError(f"causal_lm_loss with config.{name}={getattr(config, name)!r}")
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise NotImplementedError(
            f"causal_lm_loss with an LM head of type {type(head).__name__} (only a plain nn.Linear; "
            "a LoRA adapter on lm_head is not supported by the chunked loss)"
        )
    hidden, shifted = causal_lm_hidden_states(model, input_ids, labels, ignore_index, **model_kwargs)
    return chunked_lm_loss(
        hidden,
        head.weight,
        shifted,
        lm_head_bias=head.bias,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_softcap=getattr(config, "final_logit_softcapping", None),
    )
