"""Optimizers and learning-rate schedules named as in transformers `TrainingArguments`.

Schedules (``step`` counts optimizer steps from 0, ``W`` warmup steps, ``T`` total steps)::

    warmup     lr(step) = lr * step / W                               for step < W
    linear     lr(step) = lr * max(0, (T - step) / (T - W))
    cosine     lr(step) = lr * 0.5 * (1 + cos(pi * (step - W) / (T - W)))
               (SGDR without restarts, Loshchilov & Hutter 2016, https://arxiv.org/abs/1608.03983)
    constant   lr(step) = lr

These are the formulas of transformers' `get_{linear,cosine,constant}_schedule_with_warmup`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", *BNB_OPTIMIZERS)
SCHEDULERS = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (see the module docstring)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"lr_scheduler_type={kind!r} is not supported; allowed: {', '.join(SCHEDULERS)}")
    if step < warmup_steps:  # 1. linear warmup from 0
        return step / max(1, warmup_steps)
    if kind == "constant":  # 2. then flat ...
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 3. ... or decay to 0 at T
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    kind: str) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, total_steps, warmup_steps, kind)  # validates `kind`
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, kind))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay; 1-D tensors (biases, norms, magnitudes) do not."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters: check lora.target_modules")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name: str, groups: Iterable[dict], lr: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2017, https://arxiv.org/abs/1711.05101) by the name TrainingArguments uses.

    ``adamw_8bit`` / ``paged_adamw_*`` come from bitsandbytes (8-bit states: Dettmers et al. 2021,
    https://arxiv.org/abs/2110.02861), imported only when asked for.
    """
    groups = list(groups)
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    if name in BNB_OPTIMIZERS:
        try:
            import bitsandbytes.optim as bnb_optim
        except ImportError as err:
            raise ImportError(f"optim={name!r} needs bitsandbytes (`pip install bitsandbytes`); "
                              "or use optim=adamw_torch") from err
        return getattr(bnb_optim, BNB_OPTIMIZERS[name])(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optim={name!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
