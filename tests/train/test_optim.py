"""Learning-rate schedules against transformers' formulas; optimizer names; missing bitsandbytes."""

from __future__ import annotations

import sys

import pytest
import torch

from lorakit.train.optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_matches_transformers(kind):
    from transformers import get_scheduler

    total, warmup = 20, 4
    p = torch.nn.Parameter(torch.zeros(2, 2))
    ours = build_scheduler(torch.optim.SGD([p], lr=1.0), total, warmup, kind)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    ref = get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours.optimizer.step(), ours.step(), ref_opt.step(), ref.step()


def test_bad_schedule_names_allowed():
    with pytest.raises(ValueError, match="allowed: cosine, linear, constant"):
        lr_factor(0, 10, 0, "polynomial")


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.1
    assert [p.shape for p in no_decay["params"]] == [torch.Size([4])] and no_decay["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model.requires_grad_(False), 0.1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps(name):
    pytest.importorskip("bitsandbytes") if "8bit" in name or "paged" in name else None
    p = torch.nn.Parameter(torch.ones(64, 64))
    opt = build_optimizer(name, [{"params": [p], "weight_decay": 0.0}], 0.1, (0.9, 0.999), 1e-8)
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.data.max() < 1.0  # moved against the gradient


def test_missing_bitsandbytes_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ImportError, match="optim='paged_adamw_8bit' needs bitsandbytes"):
        build_optimizer("paged_adamw_8bit", [{"params": [p]}], 0.1, (0.9, 0.999), 1e-8)
    with pytest.raises(ValueError, match="allowed: adamw_torch"):
        build_optimizer("sgd", [{"params": [p]}], 0.1, (0.9, 0.999), 1e-8)
