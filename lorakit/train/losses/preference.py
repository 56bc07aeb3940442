"""Preference losses on sequence log-probabilities: DPO (and IPO), ORPO, SimPO, KTO; and the loss module.

Notation: for a prompt x and completions y_w (chosen) and y_l (rejected), ``logp(y|x) = sum_t log pi(y_t | x, y_<t)``
over the completion tokens (|y| of them), ``pi`` the policy (LoRA adapter on), ``pi_ref`` the reference (the
same model with the adapter disabled, or log-probs precomputed once), and the implicit reward
``r(y) = beta * (logp(y|x) - logp_ref(y|x))``.

* DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with the label smoothing eps of conservative
  DPO (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf)::

      d = (logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l))
      loss = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)

* IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17; ``loss_type: ipo``), on log-ratios averaged
  over each completion's tokens as TRL does (confirmed with the IPO authors, per TRL)::

      loss = (d_w / |y_w| - d_l / |y_l| - 1 / (2 beta))^2

* ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691, eqs. 4-7), no reference, on the length-averaged
  log-probabilities ``a(y) = logp(y) / |y|``::

      log odds(y) = a(y) - log(1 - exp(a(y)))
      loss = -a(y_w) - beta log sigma(log odds(y_w) - log odds(y_l))        rewards: beta a(y)

  (the first term is the NLL of the chosen completion, averaged over its tokens; TRL averages it over the
  batch's chosen tokens, prompts included).
* SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6), no reference, length-normalised::

      loss = -(1 - eps) log sigma(beta (a(y_w) - a(y_l)) - gamma) - eps log sigma(-(...))      rewards: beta a(y)

* KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, eq. 7), unpaired completions labelled
  desirable or not; ``z0`` the batch's KL estimate ``max(0, mean(logp(y'|x) - logp_ref(y'|x)))`` over
  mismatched (x, y') pairs, detached::

      desirable:    lambda_D (1 - sigma(beta (logp(y) - logp_ref(y) - z0)))
      undesirable:  lambda_U (1 - sigma(beta (z0 - logp(y) + logp_ref(y))))

  (z0 comes from each process's micro-batch; TRL averages it over the processes of a step.)

Every function returns per-example losses; the module sums them (the training loop divides by the pairs or
examples of the whole optimizer step). Rewards and accuracies are TRL's (``rewards/accuracies`` counts ties as
wrong, so it is 0 at step 0 when the policy still equals the reference).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.chunked_logps import sequence_logps
from lorakit.train.method import LossModule

PAIRED = ("dpo", "orpo", "simpo")
"""Methods trained on (prompt, chosen, rejected) pairs; KTO takes (prompt, completion, label)."""
REFERENCE_FREE = ("orpo", "simpo")
"""Methods without a reference model."""
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO / IPO per pair (module docstring): ``(losses, chosen_rewards, rejected_rewards)``, each (B,).

    IPO needs the completion lengths (B,) to average the log-ratios per token.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps  # (B,)
    if loss_type == "sigmoid":
        d = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss(loss_type='ipo') needs chosen_lengths and rejected_lengths")
        d = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise NotImplementedError(f"DPO loss_type={loss_type!r}; available: {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO per pair on length-averaged log-probs (module docstring): ``(losses, chosen_rewards,
    rejected_rewards)``."""
    c, r = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))  # (B,)
    losses = -c - beta * F.logsigmoid(log_odds)
    return losses, beta * c.detach(), beta * r.detach()


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO per pair on length-averaged log-probs (module docstring): ``(losses, chosen_rewards,
    rejected_rewards)``."""
    d = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean(logp(y'|x) - logp_ref(y'|x)))`` over mismatched pairs, detached."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO per example (module docstring): ``(losses, rewards)``, each (B,); `desirable` is a (B,) bool mask."""
    ratio = logps - ref_logps  # (B,)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


class MetricSums:
    """Running (sum, count) per metric name between two ``pop`` calls; ``pop`` reduces over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        entry = torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                        device=values.device)])
        self.sums[name] = self.sums[name] + entry if name in self.sums else entry

    def pop(self, names: tuple[str, ...], reduce: Any = None) -> dict[str, float]:
        """Means of `names` (every process must pass the same names); counts of 0 are left out."""
        if not names:
            return {}
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        table = torch.stack([self.sums.get(n, torch.zeros(2, dtype=torch.float64, device=device)) for n in names])
        table = reduce(table) if reduce is not None else table  # (K, 2)
        self.sums.clear()
        return {n: s / c for n, (s, c) in zip(names, table.tolist(), strict=True) if c > 0}


class PreferenceLoss(LossModule):
    """Wraps a LoRA model so that ``forward(**batch)`` returns the preference loss *summed* over the batch.

    A paired batch holds chosen rows then rejected rows in one (2B, T) tensor (one forward for both); a KTO
    batch holds B completions and their B mismatched KL rows. Reference log-probs come from the batch
    (``ref_logps``, precomputed) or from the same model under ``disable_adapter()`` and ``no_grad``. Metrics
    (TRL's names) go to ``stats`` (train) or ``eval_stats`` (eval mode).
    """

    def __init__(self, model: nn.Module, method: str, cfg: Any, chunked: bool, stats: MetricSums,
                 eval_stats: MetricSums) -> None:
        super().__init__(model)
        self.method, self.cfg, self.chunked = method, cfg, chunked
        self.stats, self.eval_stats = stats, eval_stats

    def logps(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs (N,), completion tokens (N,)) of every row under the current adapter state."""
        return sequence_logps(self.model, input_ids, labels, self.chunked, attention_mask=attention_mask,
                              position_ids=position_ids)

    @torch.no_grad()
    def reference_logps(self, **rows: torch.Tensor) -> torch.Tensor:
        """Log-probs of the reference: the same model with its adapter disabled."""
        with self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext():
            return self.logps(**rows)[0]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, ref_logps: torch.Tensor | None = None, **kto: torch.Tensor
                ) -> torch.Tensor:
        rows = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids}
        stats = self.stats if self.training else self.eval_stats
        if self.method == "kto":
            return self._kto(rows, ref_logps, stats, **kto)
        p, beta = self.cfg, self.cfg.beta
        if self.method not in REFERENCE_FREE and ref_logps is None:
            ref_logps = self.reference_logps(**rows)  # (2B,)
        logps, counts = self.logps(**rows)  # (2B,), (2B,)
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = counts.chunk(2)
        if self.method == "dpo":
            ref_chosen, ref_rejected = ref_logps.chunk(2)
            losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta,
                                                    p.label_smoothing, p.loss_type, n_chosen, n_rejected)
        else:  # length-normalised, no reference
            chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
            if self.method == "orpo":
                losses, r_chosen, r_rejected = orpo_loss(chosen, rejected, beta)
            else:
                losses, r_chosen, r_rejected = simpo_loss(chosen, rejected, beta, p.simpo_gamma, p.label_smoothing)
        stats.add("rewards/chosen", r_chosen)
        stats.add("rewards/rejected", r_rejected)
        stats.add("rewards/accuracies", (r_chosen > r_rejected).float())
        stats.add("rewards/margins", r_chosen - r_rejected)
        stats.add("logps/chosen", chosen)
        stats.add("logps/rejected", rejected)
        stats.add("preference_accuracy", (chosen > rejected).float())
        return losses.sum()

    def _kto(self, rows: dict[str, torch.Tensor], ref_logps: torch.Tensor | None, stats: MetricSums,
             desirable: torch.Tensor, kl_input_ids: torch.Tensor, kl_labels: torch.Tensor,
             kl_attention_mask: torch.Tensor, kl_position_ids: torch.Tensor,
             ref_kl_logps: torch.Tensor | None = None) -> torch.Tensor:
        kl_rows = {"input_ids": kl_input_ids, "labels": kl_labels, "attention_mask": kl_attention_mask,
                   "position_ids": kl_position_ids}
        if ref_logps is None:
            ref_logps, ref_kl_logps = self.reference_logps(**rows), self.reference_logps(**kl_rows)
        with torch.no_grad():
            kl = kto_kl(self.logps(**kl_rows)[0], ref_kl_logps)
        logps, _ = self.logps(**rows)  # (B,)
        p = self.cfg
        losses, rewards = kto_loss(logps, ref_logps, desirable, kl, p.beta, p.desirable_weight, p.undesirable_weight)
        stats.add("kl", kl)
        stats.add("rewards/chosen", rewards[desirable])
        stats.add("rewards/rejected", rewards[~desirable])
        stats.add("logps/chosen", logps[desirable])
        stats.add("logps/rejected", logps[~desirable])
        return losses.sum()
