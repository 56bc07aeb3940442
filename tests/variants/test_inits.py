"""Base-modifying inits (pissa, pissa_niter_K, olora): parity with PEFT for the deterministic ones (A, B and the
residual base weight, 1e-5 fp32: same SVD/QR on the same input), properties for the randomized one, and the
conversion to a plain rank-2r LoRA on the ORIGINAL base (``path_initial_model_for_weight_conversion``)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit

from .common import check_conversion_to_plain_lora, tiny_llama

TOL = 1e-5




@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_deterministic_init_equals_peft(method):
    base = tiny_llama()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=method)
    theirs = dict(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).named_parameters())
    ours = dict(lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw)).named_parameters())
    checked = 0
    for name, p in ours.items():
        key = name.replace(".adapters.default.lora_A.", ".lora_A.default.").replace(
            ".adapters.default.lora_B.", ".lora_B.default."
        )
        if "lora_" in name or "base_layer" in name:
            torch.testing.assert_close(p, theirs[key], atol=TOL, rtol=TOL, msg=name)
            checked += 1
    assert checked == 6  # A, B and the residual base weight of two layers


def test_pissa_niter_properties():
    base = tiny_llama()
    w = base.model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights="pissa_niter_4")
    model = lorakit.get_peft_model(base, cfg)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    ad = layer.adapters["default"]
    delta = ad.delta_weight()
    torch.testing.assert_close(layer.base_layer.weight + delta, w, atol=TOL, rtol=TOL)  # residual = W - sBA
    s_full = torch.linalg.svdvals(w)
    # reconstruction error of the rank-4 part is close to the optimal (Eckart-Young) error
    err = torch.linalg.norm(w - delta)
    best = torch.sqrt((s_full[4:] ** 2).sum())
    assert err <= best * 1.05
    # B's columns are orthogonal (B = V_r sqrt(S_r / s))
    gram = ad.lora_B.weight.T @ ad.lora_B.weight
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_conversion_to_plain_lora_on_original_base(method, tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 61, (2, 6))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=method)
    config = check_conversion_to_plain_lora(lorakit.get_peft_model(copy.deepcopy(base), cfg), base, ids, tmp_path)
    assert config.r == 8 and config.init_lora_weights is True


def test_conversion_keeps_each_modules_scaling_under_rslora_with_patterns(tmp_path):
    """rsLoRA (scaling alpha / sqrt r) with rank and alpha patterns: every alpha of the rank-2r adapter is the
    original times sqrt 2 (PEFT 0.21 doubles the pattern's, which scales those modules by sqrt 2)."""
    base = tiny_llama()
    ids = torch.randint(0, 61, (2, 6))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa",
                             use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 16})
    config = check_conversion_to_plain_lora(lorakit.get_peft_model(copy.deepcopy(base), cfg), base, ids, tmp_path)
    assert config.rank_pattern == {"q_proj": 4}
    assert config.alpha_pattern == pytest.approx({"v_proj": 16 * 2**0.5})


def test_unimplemented_init_raises():
    with pytest.raises(NotImplementedError, match="mica"):
        lorakit.LoraConfig(init_lora_weights="mica")


# ---- orthogonal ---------------------------------------------------------------------------------------------
def test_orthogonal_equals_peft_given_the_same_rng_state():
    """Same three draws from torch's global generator as PEFT's ``orthogonal_init``, so the same A and B (1e-6:
    same QR and matmuls on identical inputs). Compared call for call: injection itself draws differently (PEFT runs
    nn.Linear's own init of A and B first, lorakit does not), so whole models seeded once differ."""
    base = tiny_llama(seed=0)
    kw = dict(r=6, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="orthogonal")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    from lorakit.variants.init import orthogonal_init

    for name in ("self_attn.q_proj", "mlp.down_proj"):
        p_layer = theirs.base_model.model.model.layers[0].get_submodule(name)
        o_layer = ours.base_model.model.model.layers[0].get_submodule(name)
        torch.manual_seed(7)
        p_layer.orthogonal_init("default")
        torch.manual_seed(7)
        orthogonal_init(o_layer, o_layer.adapters["default"])
        torch.testing.assert_close(o_layer.adapters["default"].lora_A.weight, p_layer.lora_A["default"].weight,
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(o_layer.adapters["default"].lora_B.weight, p_layer.lora_B["default"].weight,
                                   atol=1e-6, rtol=1e-6)


def test_orthogonal_properties_and_peft_round_trip(tmp_path):
    """B A = 0 (outputs unchanged at init, base untouched) with A and B non-zero, each of rank r/2; both get a
    gradient at step 1 (plain init gives A none); the saved adapter loads in PEFT with the same logits (1e-5)."""
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    a, b = ad.lora_A.weight, ad.lora_B.weight  # (4, 32), (32, 4)
    assert a.abs().min() > 0 and b.abs().max() > 1e-2
    assert torch.linalg.matrix_rank(a) == 2 and torch.linalg.matrix_rank(b) == 2
    assert (b @ a).abs().max() < 1e-7  # fp32 round-off of an exactly-zero product
    assert torch.equal(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)
    model(ids, labels=ids).loss.backward()
    assert a.grad.abs().max() > 0 and b.grad.abs().max() > 0
    with torch.no_grad():
        b.add_(0.1)  # "trained"
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_orthogonal_with_dora_starts_at_the_base_and_odd_rank_raises():
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(2))
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal", use_dora=True)
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="even rank, got r=3"):
        lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=3, target_modules=["q_proj"],
                                                                      init_lora_weights="orthogonal"))


# ---- LoftQ --------------------------------------------------------------------------------------------------
def _peft_loftq_reference(weight, num_bits, reduced_rank, num_iter):
    """PEFT 0.21.2's ``loftq_init`` loop (peft/utils/loftq_utils.py) with its device moved to the CPU: PEFT itself
    sends the weight to "cuda" and cannot run on a CPU-only machine. Quantization through bitsandbytes."""
    import bitsandbytes as bnb

    weight = weight.float()
    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
            deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        else:
            q = bnb.nn.Int8Params(res, requires_grad=False)
            deq = bnb.functional.int8_vectorwise_dequant(*bnb.functional.int8_vectorwise_quant(res.half())[:2])
        res = weight - deq
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        lo = u @ torch.sqrt(torch.diag(s)[:, :reduced_rank])
        ro = torch.sqrt(torch.diag(s)[:reduced_rank, :]) @ vh
        if i + 1 == num_iter:
            break
        res = weight - lo @ ro
    return deq, ro, lo


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 2)])
def test_loftq_equals_peft_algorithm(bits, iters):
    """lorakit's loftq (NF4 from lorakit.quant) against PEFT's loop on bitsandbytes, with lora_alpha = r (s = 1,
    where PEFT's split of the singular values and ours coincide). 1e-5: same quantization bits, same SVD."""
    base = tiny_llama()
    w = base.model.layers[0].mlp.down_proj.weight.detach().clone()  # (32, 64)
    cfg = lorakit.LoraConfig(
        r=4, lora_alpha=4, target_modules=["down_proj"], init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": iters},
    )
    model = lorakit.get_peft_model(base, cfg)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    q, a, b = _peft_loftq_reference(w, bits, 4, iters)
    ad = layer.adapters["default"]
    torch.testing.assert_close(layer.base_layer.weight, q, atol=TOL, rtol=TOL)
    torch.testing.assert_close(ad.lora_A.weight, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ad.lora_B.weight, b, atol=1e-4, rtol=1e-4)


def test_loftq_properties():
    """Error ||W - Q - sBA|| falls with the iterations and stays below plain NF4's ||W - Q||; the base holds
    exactly NF4-representable values (requantizing it is lossless); shapes; scaling s != 1 is accounted for."""
    from lorakit import quant
    from lorakit.variants.init import loftq_decompose

    torch.manual_seed(0)
    w = torch.randn(48, 64)
    packed, state = quant.quantize_4bit(w, blocksize=64, quant_type="nf4")
    plain = torch.linalg.norm(w - quant.dequantize_4bit(packed, state))
    errors = []
    for iters in (1, 2, 4):
        q, a, b = loftq_decompose(w, r=4, scaling=2.0, bits=4, num_iter=iters)
        assert a.shape == (4, 64) and b.shape == (48, 4)
        errors.append(torch.linalg.norm(w - q - 2.0 * b @ a))
        packed, state = quant.quantize_4bit(q, blocksize=64, quant_type="nf4")
        torch.testing.assert_close(quant.dequantize_4bit(packed, state), q, atol=0, rtol=0)
    assert errors[0] < plain and errors[1] < errors[0] and errors[2] < errors[1]


def test_loftq_config_rules():
    with pytest.raises(ValueError, match="loftq_config"):
        lorakit.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits"):
        lorakit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3, "loftq_iter": 1})
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert lorakit.LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1}).loftq_config == {}
    from lorakit.config import LoftQConfig

    cfg = lorakit.LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=2))
    assert cfg.to_dict()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}  # PEFT's saved form


def test_loftq_model_close_to_original_and_saves_for_peft(tmp_path):
    """LoftQ's model at init is close to the original (W ~ Q + sBA); the adapter and the Q base load in PEFT."""
    base = tiny_llama()
    ids = torch.randint(0, 61, (2, 6))
    cfg = lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": 2},
    )
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        want = base(ids).logits
        got = model(ids).logits
        with model.disable_adapter():
            quantized_only = model(ids).logits
    assert (got - want).abs().max() < (quantized_only - want).abs().max()
    # PEFT's LoftQ recipe (examples/loftq_finetuning): save with init_lora_weights=True so that loading does not
    # run loftq_init again (PEFT's runs on "cuda" only).
    model.peft_config["default"].init_lora_weights = True
    model.peft_config["default"].loftq_config = {}
    model.save_pretrained(tmp_path / "adapter")
    q_base = model.unload()  # the Q base, what LoftQ's adapter is trained for
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(q_base), tmp_path / "adapter")
    ours = lorakit.PeftModel.from_pretrained(q_base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, got, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.eval()(ids).logits, got, atol=1e-5, rtol=1e-5)


def test_loading_a_pissa_adapter_does_not_rerun_the_init(tmp_path) -> None:
    """A saved (unconverted) PiSSA adapter loads onto the residual base unchanged: loading must not run the
    base-modifying init a second time."""
    import copy

    from lorakit import LoraConfig, PeftModel, get_peft_model
    from tests.conftest import make_tiny_llama

    ids = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(make_tiny_llama(hidden=64), LoraConfig(r=4, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # "trained"
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    residual = copy.deepcopy(model).unload()
    before = {n: p.clone() for n, p in residual.named_parameters()}
    loaded = PeftModel.from_pretrained(residual, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    for n, p in loaded.get_base_model().named_parameters():
        key = n.replace(".base_layer", "")
        if key in before:
            assert torch.equal(p, before[key]), n
