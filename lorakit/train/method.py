"""A training method: what the loop of `lorakit.train.loop` asks of a loss (SFT; DPO, ORPO, KTO, SimPO).

The loop owns everything a method shares: accelerator, base model and adapter, data order (a pure function of
(seed, step)), token/pair-normalized accumulation over micro-batches and processes, clipping, optimizer and
schedule, checkpoints, logging, evaluation. A method supplies the rows, how they batch, and a loss that is a
*sum* over ``units`` (label tokens for SFT; pairs for DPO-style losses), so the loop can normalize it by the
units of the whole optimizer step::

    loss = (1 / N) * sum_{p, m} method.loss_module(model)(**batch_{p,m}),   N = sum_{p, m} method.units(batch_{p,m})

A new method is one module implementing `TrainingMethod` and one row of `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

Row = dict[str, Any]
"""One training row as the method's data step produces it (SFT: ``{"input_ids", "labels", ...}``)."""


class LossModule(nn.Module):
    """Base of the loss modules: holds the (LoRA-wrapped) model, and lets code call its ``generate`` through the
    loss module. Under FSDP the loss module is the root of the sharded model and `lorakit.train.distributed`
    registers ``generate`` (and a subclass's other model calls, e.g. reference log-probs) as forward methods, so
    that they run under the root's hooks (its parameters gathered) like ``forward`` does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """``self.model.generate(**kwargs)``."""
        return self.model.generate(**kwargs)


class TrainingMethod(Protocol):
    """What the training loop asks of a method (see the module docstring)."""

    name: str
    reports_perplexity: bool
    """Whether ``exp(eval_loss)`` means something (per-token cross-entropy); logged as eval_perplexity."""
    eval_before: bool
    """Whether the loop evaluates on the eval rows before training too (logged at step 0)."""

    def build_data(self, say: Callable[[str], None]) -> tuple[list[Row], list[Row], dict[str, Any]]:
        """(train rows, eval rows, stats logged as ``data_<key>`` at step 0); prints its report with `say`."""
        ...

    def collate(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Rows -> the keyword arguments of the loss module (CPU tensors)."""
        ...

    def loss_module(self, model: nn.Module) -> nn.Module:
        """A module whose ``forward(**batch)`` returns the loss *summed* over the batch's units (a scalar)."""
        ...

    def precompute(self, module: nn.Module, collective: bool) -> None:
        """Per-row values computed once from the model as loaded, before training and before a checkpoint is
        restored (DPO/KTO's reference log-probs); nothing for most methods. With `collective` (FSDP) every process
        calls it, computes its share of the rows with forwards that all processes run together, and the values
        are exchanged."""
        ...

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many units the summed loss of `batch` covers (the normalizer of the step)."""
        ...

    def tokens(self, rows: list[Row]) -> int:
        """Input tokens of `rows` (throughput and ``tokens_seen``)."""
        ...

    def pop_metrics(self, split: str, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> dict[str, float]:
        """Method metrics of ``split`` ("train", "eval", or "before" for the evaluation before training) since the
        last call, reduced over processes with `reduce` (every process calls it); logged beside the loss."""
        ...

    def summary(self) -> dict[str, Any]:
        """Method-specific entries of summary.json."""
        ...


def build_method(cfg: Any, tokenizer: Any, mask_dtype: torch.dtype) -> TrainingMethod:
    """The method of `cfg` (``method:`` in the YAML)."""
    name = getattr(cfg, "method", "sft")
    if name not in METHODS:
        raise NotImplementedError(f"method: {name!r} is not implemented; available: {', '.join(METHODS)}")
    return METHODS[name](cfg, tokenizer, mask_dtype)


def _sft(cfg: Any, tokenizer: Any, mask_dtype: torch.dtype) -> TrainingMethod:
    from lorakit.train.sft import SFT

    return SFT(cfg, tokenizer, mask_dtype)


def _preference(cfg: Any, tokenizer: Any, mask_dtype: torch.dtype) -> TrainingMethod:
    from lorakit.train.preference import Preference

    return Preference(cfg, tokenizer, mask_dtype)


METHODS: dict[str, Callable[[Any, Any, torch.dtype], TrainingMethod]] = {
    "sft": _sft, "dpo": _preference, "orpo": _preference, "kto": _preference, "simpo": _preference}
"""Method name -> constructor ``(TrainConfig, tokenizer, attention-mask dtype)``."""
