"""LoRA initialisations that start from the base weight (``init_lora_weights``), one function per method.

The methods here move the principal part of ``W`` (out, in) into the adapter and leave the residual in the base:

    W_res = W - s B A,          so that at step 0   W_res + s B A = W   (outputs unchanged)

Because the base is modified, an adapter trained this way only applies to ``W_res``. ``save_pretrained(...,
path_initial_model_for_weight_conversion=DIR)`` (``DIR``: the adapter saved right after init) writes a plain
LoRA of rank 2r for the ORIGINAL ``W`` instead (``convert_to_plain_lora``):

    W_res + s B_t A_t = W + s [B_t, -B_0] [A_t; A_0]     (same scaling: r and lora_alpha both doubled)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.config import LoraConfig


def _weight_oi(wrapper: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) fp32 (dequantized for 4-bit/8-bit bases)."""
    return wrapper.dora_weight_delta_layout()


def _set_residual(wrapper: nn.Module, residual_oi: torch.Tensor) -> None:
    """Write ``W_res`` (out, in) back into the base layer in its own layout and dtype (requantizing 4/8-bit)."""
    from lorakit import quant

    base = wrapper.base_layer
    if quant.is_quantized_linear(base):
        quant.requantize_weight_(base, residual_oi)
        return
    weight = residual_oi.T if wrapper.fan_in_fan_out else residual_oi
    base.weight.data.copy_(weight.to(base.weight.dtype))


def _set_factors(adapter: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    with torch.no_grad():
        adapter.lora_A.weight.data = lora_a.contiguous().to(adapter.lora_A.weight.dtype)
        adapter.lora_B.weight.data = lora_b.contiguous().to(adapter.lora_B.weight.dtype)


@torch.no_grad()
def pissa_init(wrapper: nn.Module, adapter: nn.Module, niter: int | None = None) -> None:
    """PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): the top-r singular triplets of ``W``,
    ``W ~ V_r S_r U_r^T``, split as ``B = V_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) U_r^T``; the base keeps the minor
    components ``W - s B A``. ``niter``: ``torch.svd_lowrank`` with that many subspace iterations (fast, random;
    "pissa_niter_K") instead of the full SVD. Same float ops as PEFT's ``pissa_init``."""
    weight = _weight_oi(wrapper)  # (out, in)
    r, s = adapter.r, adapter.scaling
    if niter is None:
        v, sv, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], sv[:r] / s, uh[:r]
    else:
        vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
        sr, uhr = sr / s, ur.t()
    lora_a = torch.diag(torch.sqrt(sr)) @ uhr  # (r, in)
    lora_b = vr @ torch.diag(torch.sqrt(sr))  # (out, r)
    _set_factors(adapter, lora_a, lora_b)
    _set_residual(wrapper, weight - s * lora_b @ lora_a)


@torch.no_grad()
def olora_init(wrapper: nn.Module, adapter: nn.Module) -> None:
    """OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): QR of ``W = Q R``; ``B = Q[:, :r]`` (orthonormal
    columns), ``A = R[:r]``; the base keeps ``W - s B A``. Same float ops as PEFT's ``olora_init`` for (out, in)
    weights (for GPT-2 Conv1D the QR is taken of the (out, in) view, where PEFT's shapes would not fit)."""
    weight = _weight_oi(wrapper)  # (out, in)
    q, rr = torch.linalg.qr(weight)
    lora_b, lora_a = q[:, : adapter.r], rr[: adapter.r]
    _set_factors(adapter, lora_a, lora_b)
    _set_residual(wrapper, weight - adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight)


def loftq_init(wrapper: nn.Module, adapter: nn.Module) -> None:
    """LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): alternate NF4 quantization of ``W - B A`` and an
    SVD of the quantization residual. Needs ``loftq_config`` on LoraConfig, which lorakit does not have yet."""
    raise NotImplementedError("init_lora_weights='loftq' (loftq_init) is not implemented in lorakit yet.")


def eva_init(wrapper: nn.Module, adapter: nn.Module) -> None:
    """EVA (Paischer et al. 2024, https://arxiv.org/abs/2410.07170): SVD of layer inputs over a few batches, with
    rank redistribution; needs a dataloader (PEFT's ``initialize_lora_eva_weights``)."""
    raise NotImplementedError("init_lora_weights='eva' (eva_init) is not implemented in lorakit yet.")


def corda_init(wrapper: nn.Module, adapter: nn.Module) -> None:
    """CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223): context-oriented SVD of ``W C`` with ``C`` the
    covariance of the layer inputs (PEFT's ``preprocess_corda``)."""
    raise NotImplementedError("init_lora_weights='corda' (corda_init) is not implemented in lorakit yet.")


def init_adapter(wrapper: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> None:
    """Run ``config.init_lora_weights`` on adapter ``adapter_name`` of ``wrapper`` (called by injection)."""
    from lorakit.layers import LoraLinear

    method = config.init_lora_weights
    if not isinstance(wrapper, LoraLinear):
        raise ValueError(
            f"init_lora_weights={method!r} applies to linear layers only; {module_name!r} is "
            f"{type(wrapper.base_layer).__name__}: exclude it (exclude_modules) or use init_lora_weights=True."
        )
    adapter = wrapper.adapters[adapter_name]
    if method == "pissa":
        pissa_init(wrapper, adapter)
    elif method.startswith("pissa_niter_"):
        pissa_init(wrapper, adapter, niter=int(method.removeprefix("pissa_niter_")))
    elif method == "olora":
        olora_init(wrapper, adapter)
    elif method == "loftq":
        loftq_init(wrapper, adapter)
    elif method == "eva":
        eva_init(wrapper, adapter)
    elif method == "corda":
        corda_init(wrapper, adapter)
    else:
        raise NotImplementedError(f"init_lora_weights={method!r} is not implemented in lorakit.")
    if adapter.wraps_base_output:  # DoRA: the magnitude of the initialised weight
        adapter.init_magnitude(wrapper)


# ---- conversion to a plain LoRA on the original base ----------------------------------------------------------
def convert_to_plain_lora(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """File tensors of a rank-2r LoRA for the original base: ``A = [A_t; A_0]`` (2r, in), ``B = [B_t, -B_0]``
    (out, 2r); other tensors unchanged (PEFT's ``subtract_mutated_init``)."""
    out = {}
    for key, value in trained.items():
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            out[key] = value
    return out


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: plain init, ``r`` doubled, ``lora_alpha`` doubled (rsLoRA: times
    sqrt 2) so ``scaling`` is unchanged; rank/alpha patterns doubled (PEFT's rules)."""
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config
