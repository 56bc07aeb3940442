"""Preference tuning as a training method (``method: dpo | orpo | kto | simpo``) on the loop of `lorakit.train.loop`.

The unit of the loss is a pair (DPO, IPO, ORPO, SimPO) or a completion (KTO): per optimizer step with ``N`` of
them over all micro-batches and processes the loop minimizes ``(1 / N) * sum_i loss_i`` (the losses of
`lorakit.train.losses.preference`).

The reference of DPO/IPO/KTO is never a second copy of the model:

* a new adapter: the same model with the adapter disabled (``disable_adapter()`` under ``no_grad``) at every
  step, or once before training with ``preference.precompute_ref_log_probs``;
* a run that starts from ``model.adapter_name_or_path`` (DPO after SFT): that adapter as loaded, whose
  log-probs are computed once before training (so always precomputed; a resumed run recomputes them from the
  same adapter before its checkpoint is restored).

Metrics (TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``; KTO adds ``kl``) are logged with the train loss and, prefixed ``eval_``,
with the eval loss. ``preference_accuracy`` is the share of pairs whose chosen completion the policy itself
scores higher (summed log-probs for DPO/IPO, per-token averages for ORPO/SimPO); held-out, it is measured
before training and at every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.train.losses.preference import REFERENCE_FREE, MetricSums, PreferenceLoss
from lorakit.train.method import Row
from lorakit.train.preference_data import build_preference_datasets, collate_preference
from lorakit.train.sft import chunked_loss_available

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "preference_accuracy")
KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


class Preference:
    """A preference method [method, preference.*, data, training.max_seq_length, training.use_chunked_loss]."""

    reports_perplexity = False
    eval_before = True

    def __init__(self, cfg: Any, tokenizer: Any, mask_dtype: torch.dtype) -> None:
        self.cfg, self.tokenizer, self.mask_dtype = cfg, tokenizer, mask_dtype
        self.name = cfg.method
        self.chunked = False
        self.reference = "none" if self.name in REFERENCE_FREE else "adapter disabled"
        self.stats, self.eval_stats = MetricSums(), MetricSums()
        self.rows: list[list[Row]] = []
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def build_data(self, say: Callable[[str], None]) -> tuple[list[Row], list[Row], dict[str, Any]]:
        t = self.cfg.training
        train, evals, stats = build_preference_datasets(self.cfg.data, self.name, self.tokenizer, t.max_seq_length)
        unit = "completions" if self.name == "kto" else "pairs"
        say(f"[lorakit] data: {stats['train_examples']} train {unit} ({stats['format']}), "
            f"{stats['train_truncated']} truncated to {t.max_seq_length} tokens"
            + (f"; {len(evals)} eval {unit}" if evals else ""))
        self.rows = [train] + ([evals] if evals else [])
        return train, evals or [], stats

    def collate(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        return collate_preference(rows, self.name, self.tokenizer.pad_token_id, self.mask_dtype)

    def loss_module(self, model: nn.Module) -> nn.Module:
        self.chunked = self.cfg.training.use_chunked_loss and chunked_loss_available(model)
        return PreferenceLoss(model, self.name, self.cfg.preference, self.chunked, self.stats, self.eval_stats)

    @torch.no_grad()
    def precompute(self, module: nn.Module, collective: bool) -> None:
        """Where the reference is precomputed, store ``ref_logps`` (and KTO's ``ref_kl_logps``) in every train and
        eval row (the loop calls this before it restores a checkpoint, so the adapter is still the one the run
        started from). With `collective` (FSDP) process r computes rows r, r + P, ... of each list, every process
        runs as many batches as the busiest one (a filler batch, uncounted), and the values are all-gathered."""
        from lorakit.train.distributed import map_in_lockstep

        start_adapter = self.cfg.model.adapter_name_or_path is not None
        if self.name in REFERENCE_FREE or not (self.cfg.preference.precompute_ref_log_probs or start_adapter):
            return
        self.reference = ("precomputed: model.adapter_name_or_path as loaded" if start_adapter
                          else "precomputed: adapter disabled")
        was_training = module.training
        module.eval()
        device = next(module.parameters()).device
        size = self.cfg.training.per_device_eval_batch_size

        def ref(batch: dict[str, torch.Tensor]) -> list[float]:
            rows = {k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask", "position_ids")}
            return (module.logps(**rows)[0] if start_adapter else module.reference_logps(**rows)).cpu().tolist()

        for rows in self.rows:

            def compute(index: list[int], rows: list[Row] = rows) -> dict[int, dict[str, Any]]:
                batch = self.collate([rows[j] for j in index] or rows[:1])  # a filler batch, not stored
                logps = ref(batch)
                if self.name == "kto":
                    kl = ref({k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")})
                    return {j: {"ref_logps": logps[b], "ref_kl_logps": kl[b]} for b, j in enumerate(index)}
                return {j: {"ref_logps": (logps[b], logps[len(index) + b])} for b, j in enumerate(index)}

            values = map_in_lockstep(len(rows), size, compute, collective, device)
            for j, row in enumerate(rows):
                row.update(values[j])
        module.train(was_training)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["desirable"].numel()) if self.name == "kto" else batch["input_ids"].shape[0] // 2

    def tokens(self, rows: list[Row]) -> int:
        if self.name == "kto":
            return sum(len(r["input_ids"]) for r in rows)
        return sum(len(r["chosen"]["input_ids"]) + len(r["rejected"]["input_ids"]) for r in rows)

    def pop_metrics(self, split: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> dict[str, float]:
        """Means of the ``train`` or eval (``eval``; ``before``: the evaluation before training) metrics since the
        last call, over all processes (`reduce`); eval names get the prefix ``eval_``."""
        stats = self.stats if split == "train" else self.eval_stats
        out = stats.pop(KTO_METRICS if self.name == "kto" else PAIR_METRICS, reduce)
        if self.name == "kto" and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if split != "train":
            if split == "before":
                self.before = out
            self.after = out
            return {f"eval_{k}": v for k, v in out.items()}
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chunked_loss": self.chunked, "reference": self.reference}
        if self.after is not None and self.name != "kto":
            out["preference_accuracy_before"] = self.before.get("preference_accuracy") if self.before else None
            out["preference_accuracy_after"] = self.after.get("preference_accuracy")
        return out
