"""Combine trained adapters into a new one: PEFT's ``add_weighted_adapter`` and its combination types.

Each adapter ``i`` of a layer contributes ``dW_i = s_i B_i A_i`` (out, in) with a user weight ``w_i``.

- ``linear`` (and the pruned forms ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) combine the
  factors separately, ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i`` and ``B = sum_i sqrt|w_i s_i| B_i`` (with the
  pruning/sign election applied to each list); equal ranks needed. Exact only for one adapter.
- ``cat`` stacks the factors: ``A = [w_i s_i A_i]`` (sum r_i, in), ``B = [B_i]`` (out, sum r_i); exact,
  ``B A = sum_i w_i dW_i``.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) combine the full
  deltas, then keep the top ``svd_rank`` singular triplets: ``B = U_r diag(S_r)``, ``A = Vh_r``.

The new adapter has ``r = lora_alpha = new_rank`` (scaling 1) and is frozen. Its config is the first adapter's
with ``use_rslora=False``: PEFT 0.21.2 keeps ``use_rslora`` and so scales the combined delta by ``sqrt(new_rank)``
(a bug, huggingface/peft#3761); lorakit's combined adapter means what the formulas here say, in PEFT too.
DoRA, as in PEFT 0.21.2: the new
adapter takes the first adapter's config (``use_dora`` included), only A and B are combined, and its
``lora_magnitude_vector`` keeps the value injection gave it, ``m = ||W + s B_0 A_0||_c`` with the init's ``B_0``
(``||W||_c`` for the default init); the sources' trained magnitudes are not combined (a warning says so). Merging
methods:
TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): keep the top-``density`` magnitudes, elect a sign per
entry, average the entries that agree. DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop entries at
random with probability ``1 - density`` and rescale by ``1 / density``. Random draws use torch's global RNG in
PEFT's order (module order; A then B), so a seeded call equals PEFT's.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import torch

from lorakit.config import init_method
from lorakit.layers import LORA_WRAPPERS, LoraEmbedding, ModulesToSaveWrapper

if TYPE_CHECKING:
    from lorakit.lora_model import LoraModel

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
_EQUAL_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear", "magnitude_prune")


# ---- merging methods on stacked task tensors (PEFT's merge_utils, same float ops) ------------------------------
def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``tensors`` (n, ...) times ``weights`` (n,) broadcast over the rest."""
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))


def magnitude_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by ``1 / density``."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, fill_value=density))
    return tensor * mask / density


def majority_sign_mask(tensors: torch.Tensor, method: str) -> torch.Tensor:
    """Entries whose sign agrees with the elected sign (n, ...): ``"total"`` sums values, ``"frequency"`` signs."""
    sign = tensors.sign()
    if method == "total":
        magnitude = tensors.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r}; allowed: 'total', 'frequency'.")
    return sign == torch.where(magnitude >= 0, 1, -1)


def combine_tensors(
    tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None, sign_method: str
) -> torch.Tensor:
    """One of ``linear`` (task arithmetic), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``."""
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, density) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, ...)
    if method in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, sign_method)
        mixed = (_weighted(stacked, weights) * mask).sum(dim=0)
        return mixed / torch.clamp(mask.sum(dim=0), min=1.0)
    return _weighted(stacked, weights).sum(dim=0)


# ---- add_weighted_adapter ------------------------------------------------------------------------------------
def _factors(adapter: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` parameters of an adapter, linear or embedding (PEFT's orientation)."""
    return adapter.factors()


def _delta_in_weight_layout(wrapper: torch.nn.Module, adapter: torch.nn.Module) -> torch.Tensor:
    """``s B A`` in the base weight's layout (PEFT's ``get_delta_weight``): (out, in), (in, out) for GPT-2 Conv1D,
    (vocab, dim) for embeddings. Random pruning draws its masks in this layout, as PEFT does."""
    return wrapper.to_base_layout(adapter.delta_weight())


def _write(target_a: torch.Tensor, target_b: torch.Tensor, a_new: torch.Tensor, b_new: torch.Tensor) -> None:
    """Copy ``a_new`` (k, in) and ``b_new`` (out, k) into the new adapter's ``A`` (r, in) and ``B`` (out, r), k <= r,
    the rest zero (adds nothing): every module keeps the config's rank, so the adapter saves, loads and mixes."""
    target_a.zero_()
    target_b.zero_()
    target_a[: a_new.shape[0]] = a_new
    target_b[:, : b_new.shape[1]] = b_new


def _check(model: LoraModel, adapters: list[str], weights: list[float], combination_type: str, svd_rank: int | None):
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise ValueError(f"adapter(s) {missing} do not exist; available: {sorted(model.peft_config)}.")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r}; allowed: {', '.join(COMBINATION_TYPES)}.")
    dora = [a for a in adapters if model.peft_config[a].variant == "dora"]
    if dora:
        kept = "keeps DoRA but re-initialises" if dora[0] == adapters[0] else "is a plain LoRA without"
        warnings.warn(
            f"add_weighted_adapter: {dora} use DoRA. Only lora_A/lora_B are combined; the new adapter follows "
            f"{adapters[0]!r}'s config and {kept} lora_magnitude_vector (m = ||W + s B A||_c at injection), so the "
            "trained magnitudes are dropped and even one adapter at weight 1 does not reproduce itself. This is "
            "PEFT 0.21.2's behaviour (huggingface/peft#3761). To keep a DoRA adapter's effect exactly, merge it into "
            "the base (merge_and_unload) instead of combining it.",
            UserWarning,
            stacklevel=3,
        )
    for wrapper in model.model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise ValueError(
                "add_weighted_adapter: several of these adapters have their own copy of the same module in "
                "modules_to_save; such copies cannot be combined."
            )
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = {
        a: c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values())
        for a, c in ((a, model.peft_config[a]) for a in adapters)
    }
    if combination_type in _EQUAL_RANK_TYPES:
        if len(set(ranks.values())) != 1:
            listed = ", ".join(f"{a!r}: r={r}" for a, r in ranks.items())
            raise ValueError(
                f"combination_type={combination_type!r} needs adapters of equal rank, got {listed}. Use 'cat' or "
                "'svd' (or one of the *_svd types) to combine adapters of different ranks."
            )
        for name, wrapper in model.model.named_modules():
            if not isinstance(wrapper, LORA_WRAPPERS):
                continue
            here = {a: wrapper.adapters[a].r for a in adapters if a in wrapper.adapters}
            if len(set(here.values())) > 1:
                listed = ", ".join(f"{a!r}: r={r}" for a, r in here.items())
                raise ValueError(
                    f"combination_type={combination_type!r} needs adapters of equal rank at each module; {name!r} has "
                    f"{listed} (rank_pattern). Use 'cat' or 'svd' (or one of the *_svd types) instead."
                )
        new_rank = next(iter(ranks.values()))
    elif combination_type == "cat":
        new_rank = sum(ranks[a] for a in adapters)  # an adapter listed twice is stacked twice
    else:
        new_rank = svd_rank or max(ranks.values())
    targets = [model.peft_config[a].target_modules for a in adapters]
    if all(isinstance(t, str) for t in targets):
        new_targets: list[str] | str = "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, list) for t in targets):
        new_targets = sorted(set().union(*targets))
    else:
        raise ValueError(
            "add_weighted_adapter: the adapters' target_modules mix regex strings and lists; combine adapters "
            "whose target_modules are all lists or all regex strings."
        )
    return combination_type, new_rank, new_targets


def add_weighted_adapter(
    model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``, a weighted combination of ``adapters`` (see the module docstring). As in PEFT, an
    existing ``adapter_name`` is left as it is; the new adapter is frozen and not activated."""
    if adapter_name in model.peft_config:
        return
    combination_type, new_rank, new_targets = _check(model, adapters, weights, combination_type, svd_rank)
    base_type = combination_type.removesuffix("_svd")
    if base_type in _NEEDS_DENSITY and density is None:
        raise ValueError(f"combination_type={combination_type!r} needs density (the fraction kept, in [0, 1]).")
    if density is not None and density < 0:
        raise ValueError(f"density={density} must be >= 0.")
    if density is not None and density >= 1 and base_type in _NEEDS_DENSITY:
        warnings.warn(f"density={density} >= 1: nothing is pruned.", stacklevel=2)
    first = model.peft_config[adapters[0]]
    init = first.init_lora_weights if init_method(first.init_lora_weights).function is None else True
    config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        alpha_pattern={},
        rank_pattern={},
        init_lora_weights=init,
        use_rslora=False,  # the factors below are built for scaling 1 (PEFT keeps rsLoRA: sqrt(new_rank) too much)
    )
    model.inject(config, adapter_name)
    for wrapper in model.model.modules():
        if not isinstance(wrapper, LORA_WRAPPERS) or adapter_name not in wrapper.adapters:
            continue
        new = wrapper.adapters[adapter_name]
        new.requires_grad_(False)
        target_a, target_b = _factors(new)
        present = [(wrapper.adapters[a], w) for a, w in zip(adapters, weights, strict=True) if a in wrapper.adapters]
        if not present:
            raise ValueError(f"none of the adapters {adapters} adapts a module that {adapter_name!r} targets.")
        with torch.no_grad():
            if combination_type == "cat":
                a_cat = torch.cat([_factors(ad)[0] * w * ad.scaling for ad, w in present], dim=0)  # (sum r, in)
                b_cat = torch.cat([_factors(ad)[1] for ad, _ in present], dim=1)  # (out, sum r)
                _write(target_a, target_b, a_cat, b_cat)
            elif combination_type.endswith("svd"):
                transposed = isinstance(wrapper, LoraEmbedding) or getattr(wrapper, "fan_in_fan_out", False)
                a_new, b_new = _svd_combine(
                    [_delta_in_weight_layout(wrapper, ad) for ad, _ in present],
                    transposed,
                    [w for _, w in present],
                    base_type if base_type != "svd" else "linear",
                    new_rank,
                    density,
                    majority_sign_method,
                    svd_clamp,
                    svd_full_matrices,
                    svd_driver,
                )
                _write(target_a, target_b, a_new, b_new)
            else:
                weights_a, weights_b, list_a, list_b = [], [], [], []
                for ad, w in present:
                    ws = w * ad.scaling
                    weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
                    weights_b.append(math.sqrt(abs(ws)))
                    a, b = _factors(ad)
                    list_a.append(a.data)
                    list_b.append(b.data)
                device = list_a[0].device
                a_new = combine_tensors(
                    list_a, torch.tensor(weights_a).to(device), combination_type, density, majority_sign_method
                )
                b_new = combine_tensors(
                    list_b, torch.tensor(weights_b).to(device), combination_type, density, majority_sign_method
                )
                _write(target_a, target_b, a_new, b_new)


def _svd_combine(
    deltas: list[torch.Tensor],
    transposed: bool,
    weights: list[float],
    method: str,
    rank: int,
    density: float | None,
    sign_method: str,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine full deltas (out, in), or (in, out) when ``transposed``, then truncate the SVD of the (out, in)
    result: ``A = Vh_k`` (k, in), ``B = U_k diag(S_k)`` (out, k), ``k = min(rank, out, in)``. A ``rank`` above
    ``min(out, in)`` keeps every triplet and ``_write`` pads the rest with zeros (exact; PEFT 0.21.2 builds
    mismatched factors there)."""
    delta = combine_tensors(deltas, torch.tensor(weights).to(deltas[0].device), method, density, sign_method)
    delta = delta.T if transposed else delta  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.shape[0])  # a rank above min(out, in) keeps every triplet
    u = u[:, :k] @ torch.diag(s[:k])  # (out, k)
    vh = vh[:k, :]  # (k, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u
