"""Per-token log-probabilities through the LM head in row chunks, never holding the full (N, V) logits.

Preference losses (DPO, ORPO, KTO, SimPO) need the log-probability of each completion token,

    z = softcap(h W^T + b)                  # (M, V) for the M completion tokens only
    logp_i = z_i[y_i] - logsumexp(z_i)      # (M,)

with a per-token upstream gradient ``g_i`` (unlike cross-entropy, whose upstream gradient is one scalar).
Its gradient with respect to the logits is ``dz_i = g_i * (onehot(y_i) - softmax(z_i))`` (chained through the
softcap by ``dl = dz * (1 - (z / c)^2)``), then ``dh = dl W``, ``dW = dl^T h``, ``db = sum_i dl_i``.

The forward keeps only the (M,) log-sum-exps; the backward recomputes one (chunk, V) fp32 block at a time
(the recompute trade of Liger Kernel's fused linear losses, https://arxiv.org/abs/2410.10989). Rows without a
label (prompt, padding) are dropped before the head, so a pair costs logits only for its completion tokens.
`token_logps_reference` is the plain computation on full logits that the chunked one is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.chunked_ce import auto_chunk_size, causal_lm_hidden_states


def token_logps_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, logit_softcap: float | None = None) -> torch.Tensor:
    """(N,) fp32 log-probabilities of ``labels`` from full (N, V) logits (``log_softmax`` then ``gather``)."""
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_size: int, logit_softcap: float | None) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        for s in range(0, n, chunk_size):
            z = F.linear(hidden[s : s + chunk_size], weight, bias).float()  # (c, V)
            if logit_softcap is not None:
                z = torch.tanh(z / logit_softcap).mul_(logit_softcap)
            lse[s : s + chunk_size] = torch.logsumexp(z, dim=-1)
            out[s : s + chunk_size] = z.gather(1, labels[s : s + chunk_size, None]).squeeze(1) - lse[s : s + chunk_size]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.logit_softcap = chunk_size, logit_softcap
        device = hidden.device.type  # the backward recomputes the logits under the forward's autocast state
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        cap, chunk = ctx.logit_softcap, ctx.chunk_size
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        dh = torch.empty_like(hidden) if need_dh else None  # (N, H)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_db else None
        grad = grad.float()
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype, enabled=enabled):
            for s in range(0, hidden.shape[0], chunk):
                _backward_chunk(hidden, weight, bias, labels, lse, grad, s, chunk, cap, dh, dw, db)
        return (dh, dw.to(weight.dtype) if dw is not None else None,
                db.to(bias.dtype) if db is not None else None, None, None, None)


def _backward_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    lse: torch.Tensor, grad: torch.Tensor, s: int, chunk: int, cap: float | None,
                    dh: torch.Tensor | None, dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """Rows ``s : s + chunk`` of the backward: accumulate into dh, dw, db."""
    h, y, g = hidden[s : s + chunk], labels[s : s + chunk], grad[s : s + chunk]  # (c, H), (c,), (c,)
    z = F.linear(h, weight, bias).float()  # (c, V)
    if cap is not None:
        z = torch.tanh(z / cap).mul_(cap)
        dcap = 1.0 - (z / cap).square_()
    dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax(z)
    dz[torch.arange(dz.shape[0], device=dz.device), y] += g  # + g * onehot(y)
    if cap is not None:
        dz.mul_(dcap)
    if dh is not None:
        dh[s : s + chunk] = dz.to(hidden.dtype) @ weight  # (c, H); autocast casts as the forward's F.linear
    if dw is not None:
        dw.addmm_(dz.t(), h.float())
    if db is not None:
        db += dz.sum(0)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: torch.Tensor | None = None, chunk_size: int | None = None,
                        logit_softcap: float | None = None) -> torch.Tensor:
    """(N,) fp32 ``log softmax(softcap(hidden W^T + b))[labels]`` in chunks of rows (see the module docstring).

    Args:
        hidden: (N, H) final hidden states of the rows that have a label.
        weight: (V, H) LM head; bias: optional (V,). They get gradients only if they require them.
        labels: (N,) int64 targets (no ignore_index: select the labelled rows first).
        chunk_size: rows per (chunk, V) block; None picks ``auto_chunk_size(V)`` (about 128 MiB of fp32).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be (N={hidden.shape[0]},), got shape {tuple(labels.shape)}")
    chunk_size = auto_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return _ChunkedTokenLogps.apply(hidden, weight, bias, labels, chunk_size, logit_softcap)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunked: bool = True,
                   ignore_index: int = -100, **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are.

    ``logps[b] = sum_{t : labels[b, t+1] != ignore} log p(labels[b, t+1] | input_ids[b, :t+1])`` (labels are
    unshifted, as in `lorakit.train.data`). With `chunked` the decoder runs up to its final hidden states
    (``causal_lm_hidden_states``) and only the labelled positions go through the LM head
    (``chunked_token_logps``); otherwise the model's full logits are used (heads the chunked path cannot take:
    a LoRA adapter on lm_head, ``logit_scale``).

    Returns:
        logps: (B,) fp32; counts: (B,) int64 labelled tokens per row.
    """
    if not chunked:
        logits = model(input_ids=input_ids, use_cache=False, **model_kwargs).logits[:, :-1]  # (B, T-1, V)
        target = labels[:, 1:]  # (B, T-1)
        ok = target != ignore_index
        tok = logits.float().log_softmax(-1).gather(2, target.clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
        return (tok * ok).sum(1), ok.sum(1)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    hidden, shifted = causal_lm_hidden_states(model, input_ids, labels, ignore_index, **model_kwargs)  # (B*T, H)
    rows = (shifted != ignore_index).nonzero().squeeze(1)  # (M,) labelled positions
    tok = chunked_token_logps(hidden.index_select(0, rows), head.weight, shifted.index_select(0, rows),
                              head.bias, logit_softcap=getattr(base.config, "final_logit_softcapping", None))  # (M,)
    seq = torch.div(rows, input_ids.shape[1], rounding_mode="floor")  # (M,) row of each token
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=tok.device).index_add(0, seq, tok)
    counts = torch.bincount(seq, minlength=input_ids.shape[0])
    return logps, counts
