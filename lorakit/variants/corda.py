"""CorDA preprocessing (Yang et al. 2024, https://arxiv.org/abs/2406.05223): context-oriented decomposition.

For each targeted linear layer with weight ``W`` (out, in), collect the covariance of its inputs over calibration
data, ``C = mean_batches(X^T X)`` (in, in) with each batch ``X`` (tokens, in) divided by ``|max(X)|`` (PEFT's
normalisation), then take the SVD of the weight in the data's metric,

    W C = U S V^T,        W = U S (V^T C^-1)          (C damped until inverting it is accurate)

and keep r components: the top r for "ipm" (instruction-previewed: the adapter starts from what the task data
excites most) or the last r for "kpm" (knowledge-preserved: the base keeps the principal, pre-trained part).
``corda_init`` (``lorakit.variants.init``) then builds A, B from them and leaves ``W - s B A`` in the base.

Use as in PEFT: ``preprocess_corda(model, config, run_model=lambda: ...)`` on the plain model, then
``get_peft_model(model, config)`` with ``init_lora_weights="corda"``. The decomposition is held beside the model
(never as attributes of its modules) until injection consumes it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.config import LoraConfig

#: module -> (U_r (out, r), S_r (r,), V_r (in, r)) waiting for ``corda_init``.
_EIGENS: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)

#: Largest accepted ||(C + damp) (C + damp)^-1 - I||_F; the damping doubles until it holds (PEFT's value).
INVERSE_TOLERANCE = 0.05


def _targets(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, nn.Module]]:
    """Targeted ``nn.Linear`` / GPT-2 ``Conv1D`` modules (PEFT's CorDA skips other types)."""
    from lorakit.inject import find_targets

    modules = dict(model.named_modules())
    for name in find_targets(model, config):
        if isinstance(modules[name], nn.Linear | Conv1D):
            yield name, modules[name]


def _rank(config: LoraConfig, name: str) -> int:
    from lorakit.config import pattern_value

    return int(pattern_value(config.rank_pattern, name, config.r))


@torch.no_grad()
def collect_covariance(
    model: nn.Module, config: LoraConfig, run_model: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """``{name: C}`` (in, in): the mean over forward calls of ``X^T X / max(X)^2`` of each target's input."""
    fp16 = config.corda_config.use_float16_for_covariance
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if not fp16:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError(f"CorDA: non-finite input to {name!r}; check the calibration data.")
        cov = x.t() @ x  # (in, in)
        sums[name] = sums[name] + cov if name in sums else cov
        counts[name] = counts.get(name, 0) + 1

    handles = [m.register_forward_hook(lambda m, i, o, n=n: hook(n, m, i, o)) for n, m in _targets(model, config)]
    training = model.training
    model.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    missing = [n for n, _ in _targets(model, config) if n not in sums]
    if missing:
        raise ValueError(f"CorDA: run_model never ran these target layers: {missing}.")
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def decompose(weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W C = U S V^T`` for ``W`` (out, in); returns U (out, k), S (k,), ``(V^T C^-1)^T`` (in, k), k = min."""
    cov = covariance.float()  # (in, in)
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + eye * torch.mean(torch.diag(cov)) * damp
        cov_inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ cov_inv, eye).item() < INVERSE_TOLERANCE:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    return u, s, (vh @ cov_inv).t()


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Build CorDA's per-layer decomposition for ``model`` (PEFT's ``preprocess_corda``).

    ``run_model`` runs the model on calibration data (its inputs are collected by hooks); it may be None when
    ``corda_config.cache_file`` or ``covariance_file`` already exists. ``hooked_model`` (rare): collect the
    covariance on this model instead (same module names). Files are written when named and absent.
    """
    cfg = lora_config.corda_config
    if cfg is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (init_lora_weights='corda' sets it).")
    targets = dict(_targets(model, lora_config))
    if cfg.cache_file is not None and os.path.exists(cfg.cache_file) and os.path.getsize(cfg.cache_file) > 0:
        cache = torch.load(cfg.cache_file, map_location="cpu", weights_only=True)
        for name, module in targets.items():
            _EIGENS[module] = tuple(cache[f"{name}.eigens.{k}"] for k in ("U_WC", "S_WC", "V_WC"))
        return
    cov_file = cfg.covariance_file
    if cov_file is not None and os.path.exists(cov_file) and os.path.getsize(cov_file) > 0:
        covariances = torch.load(cov_file, map_location="cpu", weights_only=True)
    else:
        if run_model is None:
            raise ValueError("preprocess_corda: pass run_model (no cache_file or covariance_file exists yet).")
        covariances = collect_covariance(hooked_model if hooked_model is not None else model, lora_config, run_model)
        if cov_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(cov_file)), exist_ok=True)
            torch.save(covariances, cov_file)
    cache = {}
    for name, module in targets.items():
        weight = module.weight.T if isinstance(module, Conv1D) else module.weight  # (out, in)
        u, s, v = decompose(weight, covariances[name].to(weight.device))
        r = _rank(lora_config, name)
        keep = slice(None, r) if cfg.corda_method == "ipm" else slice(-r, None)
        u, s, v = u[:, keep].clone(), s[keep].clone(), v[:, keep].clone()
        if cfg.verbose:
            print(f"CorDA {name}: {cfg.corda_method} rank {r}, kept singular values {s[0]:.4g}..{s[-1]:.4g}")
        _EIGENS[module] = (u, s, v)
        cache.update({f"{name}.eigens.U_WC": u, f"{name}.eigens.S_WC": s, f"{name}.eigens.V_WC": v})
    if cfg.cache_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.cache_file)), exist_ok=True)
        torch.save(cache, cfg.cache_file)


def pop_eigens(module: nn.Module, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decomposition ``preprocess_corda`` left for ``module`` (consumed): U (out, r), S (r,), V (in, r)."""
    if module not in _EIGENS:
        raise ValueError(
            "init_lora_weights='corda': no CorDA decomposition for this layer; run "
            "lorakit.variants.corda.preprocess_corda(model, config, run_model=...) on the same model first."
        )
    u, s, v = _EIGENS.pop(module)
    if s.shape[0] != r:
        raise ValueError(
            f"CorDA decomposition has rank {s.shape[0]} but the adapter has r={r}: preprocess with the same config "
            "(and delete a cache_file built for another rank)."
        )
    return u, s, v
