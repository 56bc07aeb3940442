"""Supervised fine-tuning: next-token cross-entropy on the label tokens, summed (the loop normalizes).

Per optimizer step with ``N`` label tokens over all micro-batches and processes the loss is
``(1 / N) * sum_t CE(t)`` (every label token weighs the same, https://huggingface.co/blog/gradient_accumulation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.train.data import IGNORE_INDEX, build_datasets, collate, pack_examples
from lorakit.train.evaluate import label_tokens
from lorakit.train.method import LossModule, Row


class CausalLMLoss(LossModule):
    """Wraps a (LoRA-wrapped) causal LM so that forward returns the *summed* token cross-entropy.

    DDP wraps this module, so the decoder-only path below still syncs gradients. With `chunked` the LM
    head and cross-entropy run in vocabulary chunks (`lorakit.kernels.chunked_ce`), never holding the
    (B*T, V) logits; otherwise `F.cross_entropy` on the model's logits.
    """

    def __init__(self, model: nn.Module, chunked: bool) -> None:
        super().__init__(model)
        self.chunked = chunked

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        if self.chunked:
            from lorakit.kernels.chunked_ce import causal_lm_loss

            return causal_lm_loss(self.model, input_ids, labels, reduction="sum", **kwargs)
        logits = self.model(input_ids=input_ids, use_cache=False, **kwargs).logits  # (B, T, V)
        shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): t predicts t+1
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_available(model: nn.Module) -> bool:
    """Whether `lorakit.kernels.chunked_ce` can compute the loss of `model` (a decoder and a plain linear head)."""
    try:
        from lorakit.kernels import chunked_ce  # noqa: F401
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "get_decoder") and type(base.get_output_embeddings()) is nn.Linear


class SFT:
    """The SFT method [data, training.packing, training.max_seq_length, training.use_chunked_loss]."""

    name = "sft"
    reports_perplexity = True
    eval_before = False

    def __init__(self, cfg: Any, tokenizer: Any, mask_dtype: torch.dtype) -> None:
        self.cfg, self.tokenizer, self.mask_dtype = cfg, tokenizer, mask_dtype
        self.chunked = False

    def build_data(self, say: Callable[[str], None]) -> tuple[list[Row], list[Row], dict[str, Any]]:
        t = self.cfg.training
        train_ex, eval_ex, stats = build_datasets(self.cfg.data, self.tokenizer, t.max_seq_length)
        if t.packing:
            train_ex = pack_examples(train_ex, t.max_seq_length)
            eval_ex = pack_examples(eval_ex, t.max_seq_length) if eval_ex else eval_ex
        say(f"[lorakit] data: {stats['train_examples']} train examples ({stats['format']}), "
            f"{stats['train_truncated']} truncated to {t.max_seq_length} tokens"
            + (f", {len(train_ex)} packed rows" if t.packing else "")
            + (f"; {len(eval_ex)} eval rows" if eval_ex else ""))
        dropped = {split: stats.get(f"{split}_dropped_no_labels", 0) for split in ("train", "eval")}
        if dropped["train"] or dropped["eval"]:
            say("[lorakit] data: dropped " + " and ".join(
                f"{dropped[s]} of {stats[f'{s}_records']} {s} records" for s in ("train", "eval") if dropped[s])
                + f" with no answer token left: training.max_seq_length={t.max_seq_length} cuts the answer off "
                "(or it is empty). Raise training.max_seq_length (`lorakit preprocess CONFIG` shows the counts)")
        return train_ex, eval_ex, stats

    def collate(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        return collate(rows, self.tokenizer.pad_token_id, self.cfg.training.packing, self.mask_dtype)

    def loss_module(self, model: nn.Module) -> nn.Module:
        self.chunked = self.cfg.training.use_chunked_loss and chunked_loss_available(model)
        return CausalLMLoss(model, self.chunked)

    def precompute(self, module: nn.Module, collective: bool) -> None:
        """Nothing: SFT needs no per-row values from the model."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(label_tokens(batch["labels"]))

    def tokens(self, rows: list[Row]) -> int:
        return sum(len(r["input_ids"]) for r in rows)

    def pop_metrics(self, split: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> dict[str, float]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {"chunked_loss": self.chunked}
