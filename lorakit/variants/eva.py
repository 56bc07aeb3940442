"""EVA: explained variance adaptation (Paischer et al. 2024, https://arxiv.org/abs/2410.07170).

A data-driven init: for each adapted linear layer, the principal directions of its inputs ``X`` (tokens, in)
over a few batches (incremental PCA, until the kept directions stop moving: cosine similarity >= ``tau`` between
two batches), then

    A = top-k right-singular vectors of the centred inputs (k, in),     B = 0      (outputs unchanged at init)

with the ranks k redistributed across layers: the budget ``sum of r`` goes to the components with the largest
explained-variance ratios over all layers, each layer taking at most ``round(r * rho)``. Layers whose inputs are
identical (q/k/v of one attention block) share one PCA. ``initialize_lora_eva_weights`` is PEFT's entry point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig


class IncrementalPCA:
    """PCA updated one batch at a time (Ross et al. 2008; scikit-learn's ``IncrementalPCA`` with a full SVD):
    the SVD of ``[S V^T; X - mean(X); mean correction]`` equals the SVD of all centred data seen so far, up to
    the components dropped beyond ``n_components``."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.n_seen = 0
        self.mean: torch.Tensor | None = None  # (in,) float64
        self.var: torch.Tensor | None = None  # (in,) float64
        self.components: torch.Tensor | None = None  # (k, in)
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.explained_variance_ratio: torch.Tensor | None = None  # (k,)

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.float()  # (n, in)
        n = x.shape[0]
        total = self.n_seen + n
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        batch_mean = batch_sum / n
        centred = x - batch_mean.to(x.dtype)
        batch_m2 = centred.double().square().sum(dim=0) - centred.sum(dim=0, dtype=torch.float64).square() / n
        if self.mean is None:
            mean, m2 = batch_mean, batch_m2
            stacked = centred
        else:
            last_sum = self.mean * self.n_seen
            mean = (last_sum + batch_sum) / total
            ratio = self.n_seen / n
            m2 = self.var * self.n_seen + batch_m2 + ratio / total * (last_sum / ratio - batch_sum).square()
            correction = (self.n_seen / total * n) ** 0.5 * (self.mean - batch_mean)  # (in,)
            stacked = torch.vstack(
                (self.singular_values[:, None] * self.components, centred, correction.to(x.dtype)[None])
            )
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        rows = torch.arange(vh.shape[0])
        vh = vh * torch.sign(vh[rows, vh.abs().argmax(dim=1)])[:, None]  # sign: largest entry of each row > 0
        k = self.n_components
        self.n_seen, self.mean, self.var = total, mean, m2 / total
        self.components, self.singular_values = vh[:k], s[:k]
        self.explained_variance_ratio = (s.double().square() / m2.sum())[:k]


def forward_fn_dict(model: nn.Module, inputs: dict) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: dict, peft_config: LoraConfig) -> torch.Tensor:
    """Positions used for the SVD (n, 2): not padding (``attention_mask``) and, with ``use_label_mask``, not
    ``label_mask_value`` in ``labels`` (PEFT's default)."""
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, name: str) -> torch.Tensor:
    """The layer's input (batch, seq, in) at the positions chosen above: (n, in)."""
    x = layer_input[0] if isinstance(layer_input, tuple | list) else layer_input
    return x[model_input.T.unbind()]


def _adapted_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Every wrapper (linear or embedding) carrying ``adapter_name``."""
    from lorakit.layers import LORA_WRAPPERS

    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_WRAPPERS) and adapter_name in m.adapters}


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """The linear wrappers carrying ``adapter_name``: the layers EVA initialises."""
    from lorakit.layers import LoraLinear

    return {n: m for n, m in _adapted_layers(model, adapter_name).items() if isinstance(m, LoraLinear)}


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: Callable = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    max_batches: int = 1000,
) -> dict[str, torch.Tensor]:
    """``{layer name: A}`` (k, in) for a lorakit ``PeftModel`` with an ``init_lora_weights="eva"`` adapter; k may
    differ from r (rank redistribution). Stops when every layer's kept components converged (``tau``), and
    raises after ``max_batches`` forward passes without convergence."""
    from lorakit.config import pattern_value

    config = peft_config or model.peft_config[adapter_name]
    eva = config.eva_config
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"no linear layer carries adapter {adapter_name!r}: nothing to initialise with EVA.")
    ranks = {n: int(pattern_value(config.rank_pattern, n, config.r)) for n in layers}
    budget = sum(ranks.values())
    max_k = {n: round(r * eva.rho) for n, r in ranks.items()}
    prepare_layer = prepare_layer_inputs_fn or (lambda x, _m, _n: x[0].reshape(-1, x[0].shape[-1]))
    state: dict[str, Any] = {"model_input": None}
    seen: dict[str, torch.Tensor] = {}

    def capture(name: str, _module: nn.Module, inputs: tuple, _output: Any) -> None:
        seen[name] = prepare_layer(inputs, state["model_input"], name)

    def run(inputs: Any) -> None:
        seen.clear()
        state["model_input"] = prepare_model_inputs_fn(inputs, config) if prepare_model_inputs_fn else inputs
        forward_fn(model, inputs)

    handles = [m.base_layer.register_forward_hook(lambda m, i, o, n=n: capture(n, m, i, o)) for n, m in layers.items()]
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            batches = itertools.cycle(dataloader)
            run(next(batches))
            digests = {n: hashlib.sha1(x.float().cpu().numpy().tobytes()).hexdigest() for n, x in seen.items()}
            owner: dict[str, str] = {}  # layer -> the layer whose PCA it shares (identical inputs)
            for n in layers:
                owner[n] = next(o for o in layers if digests[o] == digests[n])
            for n in layers:
                max_k[owner[n]] = max(max_k[owner[n]], max_k[n])
            pcas = {n: IncrementalPCA(max_k[n]) for n in layers if owner[n] == n}
            converged = dict.fromkeys(pcas, False)
            dist = dict(ranks)
            for step in range(max_batches):
                if step > 0:
                    run(next(batches))
                for n, pca in pcas.items():
                    x = seen[n]
                    if converged[n] or x.shape[0] < pca.n_components:
                        continue
                    before = pca.components
                    pca.partial_fit(x)
                    if before is not None:
                        sim = torch.nn.functional.cosine_similarity(pca.components, before, dim=1)
                        pca.similar = sim >= eva.tau
                if any(p.components is None for p in pcas.values()):
                    continue
                dist = _rank_distribution(pcas, owner, budget, max_k)
                for n, pca in pcas.items():
                    kept = max(dist[m] for m in layers if owner[m] == n)
                    converged[n] = hasattr(pca, "similar") and bool(pca.similar[:kept].all())
                if all(converged.values()):
                    break
            else:
                raise RuntimeError(
                    f"EVA did not converge in {max_batches} batches (tau={eva.tau}); lower tau or pass more data."
                )
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    out = {}
    for n in layers:
        pca = pcas[owner[n]]
        a = pca.components[: dist[n]].clone()
        if eva.whiten:
            a /= pca.singular_values[: dist[n]].sqrt()[:, None]
        out[n] = a
    return out


def _rank_distribution(
    pcas: Mapping[str, IncrementalPCA], owner: Mapping[str, str], budget: int, max_k: Mapping[str, int]
) -> dict[str, int]:
    """Give the ``budget`` ranks to the largest explained-variance ratios over all layers (PEFT's rule; a layer
    sharing another's PCA competes with the same values, and the PCA's owner takes the larger count)."""
    keys, values = [], []
    for n, o in owner.items():
        ratios = pcas[o].explained_variance_ratio[: max_k[n]]
        keys += [n] * len(ratios)
        values.append(ratios)
    order = torch.cat(values).argsort(descending=True, stable=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    dist = {n: counts.get(n, 0) for n in owner}
    for n, o in owner.items():
        if o != n and dist[n] > dist[o]:
            dist[n], dist[o] = dist[o], dist[n]
    return dist


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    **_: Any,
) -> nn.Module:
    """PEFT's ``initialize_lora_eva_weights``: compute (or take) the EVA state dict, then give each layer its new
    rank k with ``A`` = the k components and ``B = 0``; layers with k = 0 lose the adapter. ``lora_alpha`` is
    scaled by k / r with ``adjust_scaling_factors``; the config's ``rank_pattern``/``alpha_pattern`` record the
    new values, so the saved adapter loads in PEFT. Adapted layers the state dict lacks (embeddings, which EVA does
    not initialise) keep their default init, with a warning, as in PEFT."""
    from lorakit.config import pattern_value

    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError("initialize_lora_eva_weights needs an adapter with init_lora_weights='eva'.")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights: pass a dataloader or an eva_state_dict.")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, None, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, adapter_name
        )
    rank_pattern, alpha_pattern, targets, missing = {}, {}, [], []
    linear = _lora_layers(model, adapter_name)
    for name, wrapper in _adapted_layers(model, adapter_name).items():
        short = name.removeprefix("base_model.model.")
        r = int(pattern_value(config.rank_pattern, short, config.r))
        alpha = pattern_value(config.alpha_pattern, short, config.lora_alpha)
        old = wrapper.adapters[adapter_name]
        a = eva_state_dict.get(name) if name in linear else None
        if a is None:  # an embedding, or a layer the state dict lacks: it keeps its default init (PEFT's rule)
            missing.append(short)
            targets.append(short)
            if r != config.r:
                rank_pattern[short] = r
            if alpha != config.lora_alpha:
                alpha_pattern[short] = alpha
            continue
        k = a.shape[0]
        if k != r and config.eva_config.adjust_scaling_factors:
            alpha = alpha * k / r
        active = list(wrapper.active_adapters)
        requires_grad = old.lora_A.weight.requires_grad
        wrapper.delete_adapter(adapter_name)
        if k > 0:
            spec = dataclasses.replace(config.spec_for(short), r=k, lora_alpha=alpha, init_lora_weights=True)
            new = wrapper.add_adapter(adapter_name, spec)
            new.lora_A.weight.copy_(a.to(new.lora_A.weight))
            new.lora_B.weight.zero_()
            new.after_init(wrapper)
            new.requires_grad_(requires_grad)
            wrapper.set_active(active)
        if k > 0:
            targets.append(short)
        if k > 0 and k != config.r:
            rank_pattern[short] = k
        if k > 0 and alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    config.target_modules = targets
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    if missing:
        warnings.warn(
            f"EVA: these layers keep their default init (init_lora_weights=True) because they were not found in the "
            f"eva state_dict: {missing} (EVA initialises linear layers only).",
            UserWarning,
            stacklevel=2,
        )
    return model
