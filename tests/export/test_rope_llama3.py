"""Llama 3.1 RoPE scaling (``rope_type="llama3"``: Llama 3.1 / 3.2 / 3.3) in GGUF files, both directions.

llama.cpp stores it as the tensor ``rope_freqs.weight`` (the divisor of each RoPE frequency); transformers' GGUF
loader skips that tensor and builds plain RoPE, so a Llama 3.x GGUF loaded by it alone is another model (checked
below). lorakit writes the tensor on export and rebuilds the scaling from it on load; the opt-in (``-m slow``)
last test checks the file against llama.cpp itself.
"""

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.export import export_gguf
from lorakit.export.arch import ROPE_FREQS, llama3_rope_from_factors, rope_freq_factors

pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[2]
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def make_llama3_model(out: Path) -> Path:
    """A tiny Llama with Llama 3.1 RoPE scaling whose band of blended frequencies has 3 of its 16 (head_dim 32,
    original context 64: positions past 64 are where the scaling matters)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False, rope_parameters=dict(LLAMA3))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = make_llama3_model(tmp_path_factory.mktemp("llama3_model"))
    file = export_gguf(folder, tmp_path_factory.mktemp("llama3_gguf") / "m.gguf", outtype="f32", progress=False,
                       echo=None)
    return folder, file


IDS = torch.randint(3, 400, (1, 100), generator=torch.Generator().manual_seed(1))  # 100 > the original 64


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_export_writes_rope_freqs_and_load_rebuilds_the_scaling(llama3):
    from transformers import AutoModelForCausalLM

    from lorakit.export.gguf_read import GGUFFile

    folder, file = llama3
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    stored = GGUFFile(file)
    rope = next(t for t in stored.tensors if t.name == ROPE_FREQS)
    torch.testing.assert_close(torch.from_numpy(stored.dequantized(rope)), rope_freq_factors(source.config))
    model, _ = lorakit.load_model(file)
    assert model.config.rope_parameters == {**LLAMA3, "original_max_position_embeddings": 64}
    torch.testing.assert_close(logits(model), logits(source), atol=1e-5, rtol=0)  # same fp32 weights and RoPE
    plain = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    assert (logits(plain) - logits(source)).abs().max() > 1e-3  # what transformers' loader alone gives


def test_gguf_to_gguf_export_keeps_the_scaling(llama3, tmp_path):
    folder, file = llama3
    again = export_gguf(file, tmp_path / "again.gguf", outtype="f32", progress=False, echo=None)
    torch.testing.assert_close(logits(lorakit.load_model(again)[0]), logits(lorakit.load_model(file)[0]),
                               atol=1e-5, rtol=0)


def test_llama_3_2_parameters_are_recovered_exactly():
    """Llama 3.2's own values (head_dim 64, theta 5e5, factor 32, context 8192) from the float32 factors."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072,
                         rope_parameters=rope)
    factors = rope_freq_factors(config)
    assert llama3_rope_from_factors(factors, 500000.0, 64, config) == rope


def test_factors_of_another_form_are_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=dict(LLAMA3))
    with pytest.raises(NotImplementedError, match="cannot rebuild"):
        llama3_rope_from_factors(torch.ones(32), 10000.0, 64, config)
    wavy = torch.linspace(1, 8, 32) ** 1.5  # increasing, but not Llama 3.1's blend
    with pytest.raises(NotImplementedError, match="not Llama 3.1 RoPE scaling"):
        llama3_rope_from_factors(wavy, 10000.0, 64, config)


def test_other_rope_scaling_is_refused_by_name(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                 "factor": 2.0})
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model").save_pretrained(tmp_path / "m")
    with pytest.raises(NotImplementedError, match="rope_type='linear' is not implemented"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", progress=False, echo=None)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_reads_the_scaling_as_transformers_computes_it(llama3, tmp_path):
    """The oracle: llama.cpp (llama-cpp-python, built from its sdist when missing) on lorakit's f32 export, f32 KV
    cache, 100 positions (past the original context of 64): its logits are the source model's (measured 6e-7)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from tests.conftest import llama_cpp_module

    llama_cpp = llama_cpp_module(tmp_path)
    folder, file = llama3
    want = logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))[0].numpy()
    llama = llama_cpp.Llama(model_path=str(file), n_ctx=256, verbose=False, logits_all=True,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llama.eval(IDS[0].tolist())
    got = np.asarray(llama.scores[: IDS.shape[1]])
    assert np.abs(got - want).max() < 1e-4
