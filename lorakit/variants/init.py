"""LoRA initialisations that start from the base weight (``init_lora_weights``), one function per method.

The methods here move the principal part of ``W`` (out, in) into the adapter and leave the residual in the base:

    W_res = W - s B A,          so that at step 0   W_res + s B A = W   (outputs unchanged)

Because the base is modified, an adapter trained this way only applies to ``W_res``. ``save_pretrained(...,
path_initial_model_for_weight_conversion=DIR)`` (``DIR``: the adapter saved right after init) writes a plain
LoRA of rank 2r for the ORIGINAL ``W`` instead (``convert_to_plain_lora``):

    W_res + s B_t A_t = W + s [B_t, -B_0] [A_t; A_0]     (same scaling: r and lora_alpha both doubled)

``orthogonal`` and ``eva`` only set the factors (``B A = 0`` at init) and leave the base as it is. LoftQ is the
exception among the base-modifying ones: its base is the quantized ``Q``, and ``Q + s B_0 A_0`` only approximates
``W``, so the conversion is exact for pissa, olora and corda only; a LoftQ adapter belongs with the saved ``Q`` base.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.config import LoraConfig


def _weight_oi(wrapper: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) fp32 (dequantized for 4-bit/8-bit bases)."""
    return wrapper.base_weight_fp32()


def _set_residual(wrapper: nn.Module, residual_oi: torch.Tensor) -> None:
    """Write ``W_res`` (out, in) back into the base layer in its own layout and dtype (requantizing 4/8-bit)."""
    from lorakit import quant

    base = wrapper.base_layer
    if quant.is_quantized_linear(base):
        quant.requantize_weight_(base, residual_oi)
        return
    weight = residual_oi.T if wrapper.fan_in_fan_out else residual_oi
    base.weight.copy_(weight.to(base.weight.dtype))  # under no_grad; bumps the version (DoRA's norm cache)


def _set_factors(adapter: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    with torch.no_grad():
        adapter.lora_A.weight.data = lora_a.contiguous().to(adapter.lora_A.weight.dtype)
        adapter.lora_B.weight.data = lora_b.contiguous().to(adapter.lora_B.weight.dtype)


@torch.no_grad()
def pissa_init(wrapper: nn.Module, adapter: nn.Module, config: LoraConfig | None = None) -> None:
    """PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): the top-r singular triplets of ``W``,
    ``W ~ V_r S_r U_r^T``, split as ``B = V_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) U_r^T``; the base keeps the minor
    components ``W - s B A``. ``niter``: ``torch.svd_lowrank`` with that many subspace iterations (fast, random;
    "pissa_niter_K") instead of the full SVD. Same float ops as PEFT's ``pissa_init``."""
    method = config.init_lora_weights if config is not None else "pissa"
    niter = int(method.removeprefix("pissa_niter_")) if method.startswith("pissa_niter_") else None
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
def olora_init(wrapper: nn.Module, adapter: nn.Module, config: LoraConfig | None = None) -> None:
    """OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): QR of ``W = Q R``; ``B = Q[:, :r]`` (orthonormal
    columns), ``A = R[:r]``; the base keeps ``W - s B A``. Same float ops as PEFT's ``olora_init`` for (out, in)
    weights (for GPT-2 Conv1D the QR is taken of the (out, in) view, where PEFT's shapes would not fit)."""
    weight = _weight_oi(wrapper)  # (out, in)
    q, rr = torch.linalg.qr(weight)
    lora_b, lora_a = q[:, : adapter.r], rr[: adapter.r]
    _set_factors(adapter, lora_a, lora_b)
    _set_residual(wrapper, weight - adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight)


def _quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(W))`` (out, in) fp32: NF4 with blocksize 64 and fp32 absmax (bitsandbytes'
    ``Params4bit(compress_statistics=False, quant_type="nf4")``, as PEFT's loftq), or row-wise int8."""
    from lorakit import quant
    from lorakit.quant.linear8bit import dequantize_8bit_rowwise, quantize_8bit_rowwise

    if bits == 4:
        packed, state = quant.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
        return quant.dequantize_4bit(packed, state).float()
    return dequantize_8bit_rowwise(*quantize_8bit_rowwise(weight))


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor, r: int, scaling: float, bits: int = 4, num_iter: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating minimisation of ``||W - Q - s B A||_F`` (Li et al. 2023, algorithm 1).

        Q_t = dequant(quant(W - s B_{t-1} A_{t-1}))           (B_0 A_0 = 0)
        s B_t A_t = SVD_r(W - Q_t)                             (the top-r part of the quantization residual)

    with ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``. Returns ``(Q, A, B)``: Q (out, in), A (r, in),
    B (out, r), all fp32. PEFT splits ``sqrt(S_r)`` without the ``/ s``, which is the same when ``lora_alpha = r``
    (s = 1); for other alphas PEFT's ``Q + s B A`` no longer approximates ``W``, ours does.
    """
    weight = weight.float()  # (out, in)
    res = weight
    for i in range(num_iter):
        qweight = _quantize_roundtrip(res, bits)  # (out, in)
        lora_a, lora_b = loftq_factors(weight, qweight, r, scaling)
        if i + 1 < num_iter:
            res = weight - scaling * lora_b @ lora_a
    return qweight, lora_a, lora_b


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor, qweight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's adapter step for a fixed quantized weight: the best rank-r fit of the quantization residual,

        s B A = SVD_r(W - Q) = U_r S_r V_r^T,        B = U_r sqrt(S_r / s)  (out, r),  A = sqrt(S_r / s) V_r^T  (r, in)

    (Eckart-Young: no rank-r ``s B A`` brings ``Q + s B A`` closer to ``W`` in Frobenius norm). ``weight`` W and
    ``qweight`` Q (the dequantized weight) are (out, in) fp32. Returns ``(A, B)``."""
    u, sv, vh = torch.linalg.svd(weight - qweight, full_matrices=False)  # (out, k), (k,), (k, in)
    sr = torch.sqrt(sv[:r] / scaling)  # (r,)
    return sr[:, None] * vh[:r], u[:, :r] * sr


@torch.no_grad()
def loftq_init(wrapper: nn.Module, adapter: nn.Module, config: LoraConfig) -> None:
    """LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): the base becomes the dequantized quantized weight
    ``Q`` and the adapter the top-r SVD of ``W - Q`` (``loftq_decompose``), so ``Q + s B A ~ W`` at init and the
    base can be quantized to ``loftq_bits`` without further loss. Apply it to a full-precision model (as in PEFT);
    the adapter is meant for the quantized base ``Q`` (save the base after init)."""
    from lorakit import quant

    if quant.is_quantized_linear(wrapper.base_layer):
        raise ValueError(
            "init_lora_weights='loftq' quantizes the base itself: apply it to the full-precision model, not to one "
            "that is already quantized."
        )
    loftq = config.loftq_config
    qweight, lora_a, lora_b = loftq_decompose(
        _weight_oi(wrapper), adapter.r, adapter.scaling, loftq["loftq_bits"], loftq["loftq_iter"]
    )
    _set_factors(adapter, lora_a, lora_b)
    _set_residual(wrapper, qweight)


@torch.no_grad()
def orthogonal_init(wrapper: nn.Module, adapter: nn.Module, config: LoraConfig | None = None) -> None:
    """Orthogonal init (Nimmaturi, "Rethinking LoRA initialisations",
    https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation; PEFT's ``orthogonal_init``): split
    the rows of a random orthogonal ``Q`` (r, r) into two halves that are orthogonal to each other,

        Q = qr(X)  (r, r),  X ~ N(0, 1);        Q_o = Q[0::2],  Q_e = Q[1::2]  (r/2, r),  Q_e Q_o^T = 0
        A = (G_a Q_o)^T / 10  (r, in),          G_a ~ N(0, 1)  (in, r/2)
        B = G_b^T Q_e / 10    (out, r),         G_b ~ N(0, 1)  (r/2, out)

    so ``B A = G_b^T (Q_e Q_o^T) G_a^T / 100 = 0``: the model is unchanged at init while both A and B are non-zero
    (each of rank r/2), and the base weight is left untouched (unlike "olora").
    The three draws use torch's global CPU generator in PEFT's order, so a seeded call gives PEFT's A and B. The rank
    must be even. The factors keep the adapter's dtype (PEFT casts them to the base weight's dtype).
    """
    r = adapter.r
    if r % 2 != 0:
        raise ValueError(
            f"init_lora_weights='orthogonal' needs an even rank, got r={r}: use an even r (and even rank_pattern "
            "values)."
        )
    q, _ = torch.linalg.qr(torch.randn(r, r))  # (r, r), orthogonal
    q_odd, q_even = q[0::2, :], q[1::2, :]  # (r/2, r) each, mutually orthogonal rows
    in_features, out_features = adapter.lora_A.weight.shape[1], adapter.lora_B.weight.shape[0]
    lora_a = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0  # (r, in)
    lora_b = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0  # (out, r)
    device = adapter.lora_A.weight.device
    _set_factors(adapter, lora_a.to(device), lora_b.to(device))


def eva_init(wrapper: nn.Module, adapter: nn.Module, config: LoraConfig | None = None) -> None:
    """EVA (Paischer et al. 2024, https://arxiv.org/abs/2410.07170) at injection: ``B = 0`` (A keeps its default
    init). The data-driven ``A`` comes later from ``lorakit.variants.eva.initialize_lora_eva_weights``."""
    with torch.no_grad():
        adapter.lora_B.weight.zero_()


@torch.no_grad()
def corda_init(wrapper: nn.Module, adapter: nn.Module, config: LoraConfig | None = None) -> None:
    """CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223): from the SVD ``W C = U S V^T`` of the weight
    times the input covariance (``lorakit.variants.corda.preprocess_corda``, which also keeps the r chosen
    components: the top ones for "ipm", the last ones for "kpm"),

        A = sqrt(S_r / s) (V_r^T C^-1)  (r, in),     B = U_r sqrt(S_r / s)  (out, r),     base = W - s B A

    Same float ops as PEFT's ``corda_init``."""
    from lorakit.variants.corda import pop_eigens

    u, sv, v = pop_eigens(wrapper.base_layer, adapter.r)  # (out, r), (r,), (in, r): V = (V^T C^-1)^T
    weight = _weight_oi(wrapper)  # (out, in)
    if not (torch.isfinite(u).all() and torch.isfinite(sv).all() and torch.isfinite(v).all()):
        raise ValueError("CorDA: non-finite values in the decomposition; check the calibration data.")
    sv = sv / adapter.scaling
    lora_a = v.t().mul(sv.sqrt().view(-1, 1))  # (r, in)
    lora_b = u.mul(sv.sqrt())  # (out, r)
    _set_factors(adapter, lora_a, lora_b)
    _set_residual(wrapper, weight - adapter.scaling * adapter.lora_B.weight @ adapter.lora_A.weight)


# ---- conversion to a plain LoRA on the original base ----------------------------------------------------------
def convert_to_plain_lora(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """File tensors of a rank-2r LoRA for the original base: ``A = [A_t; A_0]`` (2r, in), ``B = [B_t, -B_0]``
    (out, 2r); other tensors unchanged (PEFT's ``subtract_mutated_init``). Embedding factors (same orientation,
    base untouched, ``A_0 = 0``) take the same form, which adds nothing and brings them to rank 2r with the rest
    (PEFT 0.21.2 drops them from the converted file, losing the trained embedding adapter)."""
    out = {}
    for key, value in trained.items():
        if key.endswith((".lora_A.weight", ".lora_embedding_A")):
            out[key] = torch.cat([value, initial[key].to(value)], dim=0)
        elif key.endswith((".lora_B.weight", ".lora_embedding_B")):
            out[key] = torch.cat([value, -initial[key].to(value)], dim=1)
        else:
            out[key] = value
    return out


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: plain init, ``r`` and the rank pattern doubled, ``lora_alpha`` and the
    alpha pattern doubled (rsLoRA: times sqrt 2, as ``scaling = alpha / sqrt(r)`` there) so every module's
    ``scaling`` is unchanged. PEFT 0.21 doubles the alpha pattern under rsLoRA too, which scales those modules by
    sqrt 2 in its converted adapter; this follows the formula."""
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.loftq_config, config.eva_config, config.corda_config = {}, None, None
    alpha_factor = 2**0.5 if config.use_rslora else 2
    config.r *= 2
    config.lora_alpha = config.lora_alpha * alpha_factor
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: v * alpha_factor for k, v in config.alpha_pattern.items()}
    return config
