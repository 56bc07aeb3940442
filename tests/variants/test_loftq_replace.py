"""``replace_lora_weights_loftq`` on 4-bit bases (bitsandbytes' ``Linear4bit`` and lorakit's).

PEFT 0.21.2's function cannot run on a CPU-only machine: ``_loftq_init_new`` sends the weights to "cuda" (or "xpu").
The parity test runs PEFT's own ``replace_lora_weights_loftq`` (its loader, module walk and math) with that one line
of ``_loftq_init_new`` pointed at the CPU, on bitsandbytes' CPU ``Linear4bit``; A and B must agree to 1e-5 (same
NF4 bytes, lorakit's dequantization is bit-compatible with bitsandbytes', same SVD on identical residuals), with
``lora_alpha = r`` (s = 1: PEFT's split of the singular values and ours coincide only there). The model has
hidden size 64: bitsandbytes 0.50.2's CPU ``dequantize_4bit`` is wrong for rows shorter than the 64-entry block
(in_features 32: max error 0.08 against 0.02 for ours on the same bytes), so every target has in_features >= 64.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import quant

from .common import tiny_llama


def _model() -> torch.nn.Module:
    """1-layer Llama, hidden 64 (q_proj (64, 64), v_proj (32, 64), down_proj (64, 128)), seeded, eval."""
    return tiny_llama(seed=0, hidden_size=64, intermediate_size=128)


TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """The full-precision model, saved as one model.safetensors and as shards with an index json."""
    base = _model()
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    base.save_pretrained(single)
    base.save_pretrained(sharded, max_shard_size="60KB")
    assert (single / "model.safetensors").is_file() and (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    return base, single, sharded


def _bnb_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the TARGETS layers replaced by bitsandbytes' NF4 ``Linear4bit`` (CPU)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name in LAYERS:
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb LoRA layers by it
    return model


def _lorakit_4bit(folder: Path) -> torch.nn.Module:
    cfg = lorakit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model, _ = lorakit.load_model(folder, cfg)
    return model.eval()


def _peft_replace_on_cpu(monkeypatch) -> None:
    """PEFT's ``_loftq_init_new`` with its compute device set to the CPU (the only line changed)."""
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils._loftq_init_new)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in src
    namespace: dict = {}
    exec(src.replace(line, 'compute_device = "cpu"'), loftq_utils.__dict__.copy(), namespace)
    monkeypatch.setattr(loftq_utils, "_loftq_init_new", namespace["_loftq_init_new"])


def _layers(model) -> dict[str, torch.nn.Module]:
    base = model.get_base_model()
    return {name: base.get_submodule(name) for name in LAYERS}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_replace_equals_peft_on_bnb_4bit(saved, layout, monkeypatch):
    base, single, sharded = saved
    folder = single if layout == "single" else sharded
    quantized = _bnb_4bit(base)
    kw = dict(r=4, lora_alpha=4, target_modules=TARGETS)
    theirs = peft.get_peft_model(copy.deepcopy(quantized), peft.LoraConfig(**kw))
    ours = lorakit.get_peft_model(copy.deepcopy(quantized), lorakit.LoraConfig(**kw))
    _peft_replace_on_cpu(monkeypatch)
    peft.replace_lora_weights_loftq(theirs, model_path=str(folder))
    lorakit.replace_lora_weights_loftq(ours, model_path=folder)
    for name, layer in _layers(ours).items():
        p_layer = theirs.get_base_model().get_submodule(name)
        ad = layer.adapters["default"]
        assert ad.lora_B.weight.abs().max() > 0
        torch.testing.assert_close(ad.lora_A.weight, p_layer.lora_A["default"].weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ad.lora_B.weight, p_layer.lora_B["default"].weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [4, 8])
def test_quantization_error_falls_for_every_layer(saved, alpha):
    """lorakit's Linear4bit, model_path from config.name_or_path: ||W - (deq + sBA)|| < ||W - deq|| on every layer,
    and equals the optimal rank-r error (Eckart-Young) for any scaling s (PEFT's split is optimal for s = 1 only)."""
    base, single, _ = saved
    model = lorakit.get_peft_model(_lorakit_4bit(single), lorakit.LoraConfig(r=4, lora_alpha=alpha,
                                                                            target_modules=TARGETS))
    lorakit.replace_lora_weights_loftq(model)
    for name, layer in _layers(model).items():
        w = base.get_submodule(name).weight.detach()  # (out, in)
        deq = quant.dequantize_weight(layer.base_layer)
        ad = layer.adapters["default"]
        before = torch.linalg.norm(w - deq)
        after = torch.linalg.norm(w - (deq + ad.delta_weight()))
        optimal = torch.sqrt((torch.linalg.svdvals(w - deq)[4:] ** 2).sum())
        assert after < 0.97 * before, name
        torch.testing.assert_close(after, optimal, atol=1e-5, rtol=1e-4)


def test_callback_rolls_back_and_dora_magnitude(saved):
    """Returning False keeps the layer's old A, B (and DoRA magnitude) bit for bit; kept layers get m = ||Q+sBA||_c."""
    _, single, _ = saved
    model = lorakit.get_peft_model(_lorakit_4bit(single), lorakit.LoraConfig(r=4, target_modules=TARGETS,
                                                                            use_dora=True, init_lora_weights=False))
    layers = _layers(model)
    before = {n: {k: p.detach().clone() for k, p in m.adapters["default"].named_parameters()} for n, m in
              layers.items()}
    seen = []

    def keep_all_but_v(peft_model, name):
        assert peft_model is model
        seen.append(name)
        return not name.endswith("v_proj")

    lorakit.replace_lora_weights_loftq(model, model_path=single / "model.safetensors", callback=keep_all_but_v)
    assert seen == LAYERS
    for name, layer in layers.items():
        ad = layer.adapters["default"]
        now = dict(ad.named_parameters())
        if name.endswith("v_proj"):
            assert all(torch.equal(now[k], before[name][k]) for k in now), name
        else:
            assert not torch.equal(now["lora_B.weight"], before[name]["lora_B.weight"]), name
            deq = quant.dequantize_weight(layer.base_layer)
            norm = torch.linalg.vector_norm(deq + ad.delta_weight(), dim=1)  # (out,)
            torch.testing.assert_close(ad.lora_magnitude_vector.detach(), norm, atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem_and_change_nothing(saved, tmp_path):
    base, single, sharded = saved
    model = lorakit.get_peft_model(_bnb_4bit(base), lorakit.LoraConfig(r=4, target_modules=TARGETS,
                                                                      init_lora_weights=False))
    state = {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" in k}
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lorakit.replace_lora_weights_loftq(model, model_path=tmp_path)  # empty folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.replace_lora_weights_loftq(model, model_path=tmp_path / "nope.safetensors")
    partial = {k: v.contiguous() for k, v in base.state_dict().items() if "v_proj" not in k}
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="v_proj.weight"):  # q_proj comes first and must not have been replaced
        lorakit.replace_lora_weights_loftq(model, model_path=tmp_path)
    wrong = tmp_path / "wrong"  # v_proj (32, 64) saved as (64, 64): q_proj comes first and must stay unchanged
    wrong.mkdir()
    v_key = "model.layers.0.self_attn.v_proj.weight"
    save_file({**{k: v.contiguous() for k, v in base.state_dict().items()}, v_key: torch.randn(64, 64)},
              wrong / "model.safetensors")
    with pytest.raises(ValueError, match=rf"'{v_key}' in the checkpoint has shape \(64, 64\) .* \(32, 64\)"):
        lorakit.replace_lora_weights_loftq(model, model_path=wrong)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text((sharded / "model.safetensors.index.json").read_text())
    with pytest.raises(FileNotFoundError, match="shard"):
        lorakit.replace_lora_weights_loftq(model, model_path=broken)
    with pytest.raises(ValueError, match="model_path"):
        lorakit.replace_lora_weights_loftq(model)  # built from a config: no name_or_path
    with pytest.raises(ValueError, match="does not exist"):
        lorakit.replace_lora_weights_loftq(model, model_path=single, adapter_name="other")
    for k, p in model.named_parameters():
        if "lora_" in k:
            assert torch.equal(p, state[k]), k
    full = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="4-bit base"):
        lorakit.replace_lora_weights_loftq(full, model_path=single)
