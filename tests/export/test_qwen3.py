"""Qwen3 (``general.architecture = "qwen3"``): Qwen2's layout without q/k/v biases, with per-head q/k RMSNorms.

Oracles: transformers' GGUF loader (for Qwen3's own head size, 128: its ``qwen3`` mapping does not read
``attention.key_length``), lorakit's GGUF in for another head size, and llama.cpp (opt-in, ``-m slow``).
"""

import pytest
import torch

import lorakit
from lorakit.export import export_gguf
from tests.export.conftest import load_back

pytest.importorskip("gguf")
IDS = torch.randint(3, 400, (1, 20), generator=torch.Generator().manual_seed(0))


def qwen3(head_dim: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from tests.conftest import REPO

    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128, tie_word_embeddings=True)).eval()
    with torch.no_grad():  # q/k norms away from 1, so that a missing or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.3)
    return model, tokenizer


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_qwen3_round_trips_through_transformers_gguf_loader(tmp_path):
    model, tokenizer = qwen3(head_dim=128)
    out = export_gguf(model, tmp_path / "q3.gguf", tokenizer=tokenizer, outtype="f32", progress=False, echo=None)
    torch.testing.assert_close(logits(load_back(out)), logits(model), atol=1e-5, rtol=0)


def test_qwen3_with_another_head_size_loads_with_lorakit_and_re_exports(tmp_path):
    model, tokenizer = qwen3(head_dim=32)
    out = export_gguf(model, tmp_path / "q3.gguf", tokenizer=tokenizer, outtype="f32", progress=False, echo=None)
    loaded = lorakit.load_model(out)[0]
    assert loaded.config.head_dim == 32
    from lorakit.train.estimate import meta_model

    assert meta_model(str(out)).config.head_dim == 32  # lorakit inspect / estimate read the same config
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    again = export_gguf(out, tmp_path / "again.gguf", outtype="f32", progress=False, echo=None)  # GGUF source
    torch.testing.assert_close(logits(lorakit.load_model(again)[0]), logits(model), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_llama_cpp_runs_the_qwen3_exports_to_transformers_logits(tmp_path):
    """llama.cpp with an f32 KV cache, on the f32 export (measured 4e-7 from transformers' logits) and on the base
    export + the LoRA GGUF of a random adapter (measured 1.2e-6 from the merged model; the adapter moves the
    logits by ~1.1)."""
    import numpy as np

    from lorakit.export import export_gguf_lora
    from tests.conftest import llama_cpp_module
    from tests.export.conftest import merged, save_adapter

    llama_cpp = llama_cpp_module(tmp_path)
    model, tokenizer = qwen3(head_dim=32)
    f32_cache = dict(n_ctx=64, verbose=False, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                     type_v=llama_cpp.GGML_TYPE_F32)

    def llama_cpp_logits(**files) -> np.ndarray:
        llama = llama_cpp.Llama(**files, **f32_cache)
        llama.eval(IDS[0].tolist())
        return np.asarray(llama.scores[: IDS.shape[1]])

    out = export_gguf(model, tmp_path / "q3.gguf", tokenizer=tokenizer, outtype="f32", progress=False, echo=None)
    assert np.abs(llama_cpp_logits(model_path=str(out)) - logits(model)[0].numpy()).max() < 1e-4
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = save_adapter(tmp_path / "base", tmp_path / "adapter")
    lora = export_gguf_lora(adapter, tmp_path / "lora.gguf", base=tmp_path / "base", progress=False, echo=None)
    want = logits(merged(tmp_path / "base", adapter))[0].numpy()
    assert np.abs(want - logits(model)[0].numpy()).max() > 0.1  # the adapter changes the model
    assert np.abs(llama_cpp_logits(model_path=str(out), lora_path=str(lora)) - want).max() < 1e-4
