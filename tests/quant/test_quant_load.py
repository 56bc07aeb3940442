"""load_model / quantize_model / save, against transformers + bitsandbytes on CPU (oracle), both directions.

Tolerances: state dicts bit for bit, except double-quantized absmax codes (rounding rule, see
test_quant_nf4.py). Logits: exact where the state dicts are identical (same dequantize-then-matmul); 2e-2
with double quantization (a nested code one step off moves a block scale by <= 1.4% of the 256-block range).
bitsandbytes' models run in train mode so its CPU eval path does not repack weights with bf16 absmax.
"""

import json
import weakref

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorakit.quant import Linear4bit, Linear8bitLt
from lorakit.quant.config import BitsAndBytesConfig
from lorakit.quant.load import iter_safetensors, load_model, quantize_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="100KB")  # 4 shards
    return path


def _oracle(path, dtype=torch.float32, **kwargs):
    if kwargs:  # (passing quantization_config=None would override a saved one)
        kwargs = {"quantization_config": transformers.BitsAndBytesConfig(**kwargs)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    return model.train()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _assert_same_state(ours, theirs, nested_ok=False):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in b:
        if nested_ok and key.endswith(".weight.absmax") and a[key].dtype == torch.uint8:
            assert (a[key] != b[key]).float().mean() <= 0.02, key  # nested rounding rule: module docstring
            continue
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("double_quant", [False, True])
def test_load_4bit_matches_transformers(tiny_dir, double_quant):
    kwargs = dict(QLORA, bnb_4bit_use_double_quant=double_quant)
    ours, tokenizer = load_model(tiny_dir, BitsAndBytesConfig(**kwargs), torch_dtype=torch.float32)
    theirs = _oracle(tiny_dir, **kwargs)
    assert tokenizer is None
    assert isinstance(ours.model.layers[0].mlp.down_proj, Linear4bit)
    assert type(ours.lm_head) is torch.nn.Linear  # never quantized
    _assert_same_state(ours, theirs, nested_ok=double_quant)
    ids = torch.randint(0, 128, (2, 8))
    tol = 2e-2 if double_quant else 0.0
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=tol, rtol=0)
    assert ours.is_loaded_in_4bit and ours.config.quantization_config["bnb_4bit_use_double_quant"] is double_quant


def test_round_trips_with_transformers(tiny_dir, tmp_path):
    kwargs = dict(QLORA, bnb_4bit_use_double_quant=True)
    ids = torch.randint(0, 128, (2, 8))
    ours, _ = load_model(tiny_dir, BitsAndBytesConfig(**kwargs))
    ours.save_pretrained(tmp_path / "ours")  # our save -> transformers + bitsandbytes load
    theirs = _oracle(tmp_path / "ours")
    _assert_same_state(ours, theirs)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=0, rtol=0)
    fresh = _oracle(tiny_dir, **kwargs)  # transformers + bitsandbytes save -> our load
    fresh.save_pretrained(tmp_path / "theirs")
    back, _ = load_model(tmp_path / "theirs")
    _assert_same_state(back, fresh)
    torch.testing.assert_close(_logits(back, ids), _logits(fresh, ids), atol=0, rtol=0)


def test_load_8bit_matches_transformers(tiny_dir, tmp_path):
    kwargs = dict(load_in_8bit=True, llm_int8_threshold=0.0)
    ours, _ = load_model(tiny_dir, BitsAndBytesConfig(**kwargs), torch_dtype=torch.bfloat16)
    assert isinstance(ours.model.layers[1].self_attn.o_proj, Linear8bitLt)
    theirs = _oracle(tiny_dir, dtype=torch.bfloat16, **kwargs)
    _assert_same_state(ours, theirs)
    ours.save_pretrained(tmp_path / "ours8")
    back, _ = load_model(tmp_path / "ours8")
    _assert_same_state(back, ours)


def test_load_8bit_saved_by_transformers_with_the_default_threshold(tiny_dir, tmp_path):
    """transformers + bitsandbytes save 8-bit models with llm_int8_threshold=6.0: the stored weights are row-wise
    int8 + SCB whatever the threshold, so they load as stored and the threshold is kept."""
    fresh = _oracle(tiny_dir, load_in_8bit=True)
    fresh.save_pretrained(tmp_path / "theirs")
    back, _ = load_model(tmp_path / "theirs")
    _assert_same_state(back, fresh)
    assert back.model.layers[0].mlp.up_proj.threshold == 6.0  # kept on the layers too
    back.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved["load_in_8bit"] and saved["llm_int8_threshold"] == 6.0


def test_load_model_passes_attn_implementation(tiny_dir):
    model, _ = load_model(tiny_dir, BitsAndBytesConfig(**QLORA), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ImportError, match="FlashAttention2"):
        load_model(tiny_dir, BitsAndBytesConfig(**QLORA), attn_implementation="flash_attention_2")


def test_quantize_model_equals_load_model(tiny_dir):
    config = BitsAndBytesConfig(**QLORA, bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["mlp.up_proj"])
    loaded, _ = load_model(tiny_dir, config, torch_dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    quantize_model(full, config)
    assert type(full.model.layers[0].mlp.up_proj) is torch.nn.Linear  # skipped by suffix
    assert isinstance(full.model.layers[0].mlp.gate_proj, Linear4bit)
    _assert_same_state(full, loaded)


def test_plain_load_and_errors(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, torch_dtype=torch.bfloat16)  # no quantization: a normal model
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    _assert_same_state(model, reference)
    rope, ref_rope = model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq
    assert torch.equal(rope, ref_rope)  # non-persistent buffers are real, not meta garbage
    with pytest.raises(ValueError, match="needs a config with load_in_4bit"):
        quantize_model(model, BitsAndBytesConfig())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
        load_model(tmp_path)


def test_iter_safetensors_matches_safe_open(tiny_dir):
    shard = sorted(tiny_dir.glob("*.safetensors"))[0]
    ours = dict(iter_safetensors(shard))
    with safe_open(shard, "pt") as f:
        assert sorted(ours) == sorted(f.keys())
        for key in f.keys():
            assert torch.equal(ours[key], f.get_tensor(key))


def test_iter_safetensors_keeps_no_reference(tiny_dir):
    """load_model frees each full-precision weight once quantized: the reader must not hold it meanwhile."""
    shard = sorted(tiny_dir.glob("*.safetensors"))[0]
    for _, tensor in iter_safetensors(shard):
        ref = weakref.ref(tensor)
        del tensor
        assert ref() is None
