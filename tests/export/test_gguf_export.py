"""`--format gguf`: what lorakit writes loads back with transformers' GGUF loader to the merged model's logits.

Tolerances. f32: the file holds the merged float32 weights exactly (q/k rows permuted and permuted back), so
logits match to 1e-5 (float32 summation noise only). f16 / bf16 / q8_0 / q4_0: the file's only change is the
rounding of each 2-D weight; the oracle applies that same rounding (gguf's reference quantizer, the one llama.cpp's
converter uses) to the merged model, so logits again match to 1e-5. The rounding itself is checked against the
Q8_0 formula (``d = absmax / 127`` per 32 values, ``q = round(x / d)``), and the logits move away from the
unrounded model in the order of the formats' steps (f16 < bf16 < q8_0 < q4_0).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.export import export_gguf
from lorakit.export.arch import TensorNames
from lorakit.export.writer import convert, ggml_type
from tests.export.conftest import load_back, merged

pytest.importorskip("gguf")


def rounded(model: torch.nn.Module, outtype: str) -> torch.nn.Module:
    """``model`` with every weight rounded as ``outtype`` writes it (row blocks: the q/k row permutation does not
    change which values share a block)."""
    from gguf.quants import dequantize

    names = TensorNames(model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = names.gguf_name(name)
            if gname is None:
                continue
            qtype = ggml_type(outtype, gname, tuple(p.shape))
            values = dequantize(convert(p, qtype), qtype).reshape(p.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_f32_export_with_adapter_loads_back_to_merged_logits(tiny_dir, tiny_adapter, ids, tmp_path):
    out = export_gguf(tiny_dir, tmp_path / "m.gguf", adapter=tiny_adapter, outtype="f32", progress=False, echo=None)
    ref = merged(tiny_dir, tiny_adapter)
    base = load_back(export_gguf(tiny_dir, tmp_path / "base.gguf", outtype="f32", progress=False, echo=None))
    assert (logits(ref, ids) - logits(base, ids)).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(logits(load_back(out), ids), logits(ref, ids), atol=1e-5, rtol=0)


def test_rounded_exports_equal_the_rounded_merged_model(tiny_dir, tiny_adapter, ids, tmp_path):
    ref = logits(merged(tiny_dir, tiny_adapter), ids)
    deviation = {}
    for outtype in ("f16", "bf16", "q8_0", "q4_0"):
        out = export_gguf(tiny_dir, tmp_path / f"m-{outtype}.gguf", adapter=tiny_adapter, outtype=outtype,
                          progress=False, echo=None)
        oracle = logits(rounded(merged(tiny_dir, tiny_adapter), outtype), ids)
        got = logits(load_back(out), ids)
        torch.testing.assert_close(got, oracle, atol=1e-5, rtol=0, msg=outtype)
        deviation[outtype] = (got - ref).abs().max().item()
    # the rounding error follows the formats' steps (rms weight error on N(0, s) weights, relative to s:
    # f16 2e-4 < bf16 1.6e-3 < q8_0 5.5e-3 < q4_0); 0 would mean the rounding was not applied
    assert 0 < deviation["f16"] < deviation["bf16"] < deviation["q8_0"] < deviation["q4_0"], deviation


def test_q8_0_is_the_q8_0_formula():
    """gguf's Q8_0 (what the writer calls) against the block formula written out here."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    x = torch.randn(4, 64)
    got = torch.from_numpy(dequantize(convert(x, T.Q8_0), T.Q8_0))
    blocks = x.reshape(-1, 32)  # (blocks, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (blocks, 1)
    want = (torch.round(blocks / d) * d.half().float()).reshape(4, 64)  # q from the f32 scale, stored as f16
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_tensor_types_follow_the_outtype(tiny_dir, tmp_path):
    from gguf import GGUFReader

    out = export_gguf(tiny_dir, tmp_path / "q.gguf", outtype="q4_0", progress=False, echo=None)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D stays F32
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"  # kept at 8 bits under q4_0


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "tied_llama"])
def test_other_llama_family_configs_round_trip(model_type, ids, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

    from tests.conftest import REPO

    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cls = {"qwen2": Qwen2Config, "mistral": MistralConfig, "tied_llama": LlamaConfig}[model_type]
    extra = {"tie_word_embeddings": True} if model_type == "tied_llama" else {"tie_word_embeddings": False}
    if model_type == "mistral":
        extra["sliding_window"] = None
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**common, **extra)).eval()
    if model_type == "qwen2":  # Qwen2 has q/k/v biases: make them non-zero so a wrong layout shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
    out = export_gguf(model, tmp_path / f"{model_type}.gguf", tokenizer=tokenizer, outtype="f32", progress=False,
                      echo=None)
    torch.testing.assert_close(logits(load_back(out), ids), logits(model, ids), atol=1e-5, rtol=0)


def test_unsupported_architecture_lists_the_supported(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tests.conftest import REPO

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=444))
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'.*llama, mistral, qwen2"):
        export_gguf(model, tmp_path / "g.gguf", tokenizer=tokenizer, progress=False, echo=None)
    assert not any(tmp_path.iterdir())


def test_metadata_llama_cpp_reads(tiny_dir, tmp_path):
    from gguf import GGUFReader

    out = export_gguf(tiny_dir, tmp_path / "m.gguf", outtype="f16", progress=False, echo=None)
    fields = GGUFReader(out).fields
    value = {k: f.contents() for k, f in fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    assert value["general.architecture"] == "llama" and value["general.type"] == "model"
    assert value["general.file_type"] == 1 and value["general.quantization_version"] == 2
    for key, want in {"block_count": 2, "embedding_length": 32, "feed_forward_length": 64, "context_length": 256,
                      "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 8,
                      "vocab_size": 444}.items():
        assert value[f"llama.{key}"] == want, key
    assert value["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert value["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert value["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 444 and len(fields["tokenizer.ggml.merges"].data) > 0
    assert value["tokenizer.ggml.eos_token_id"] == 1 and value["tokenizer.ggml.padding_token_id"] == 0
    assert (Path(tiny_dir) / "chat_template.jinja").read_text() == value["tokenizer.chat_template"]
    types = value["tokenizer.ggml.token_type"]
    assert types[1] == 3 and types[10] == 1  # <|end|> is a control token, a plain piece is normal


def test_export_from_a_gguf_base_equals_export_from_the_folder(tiny_dir, tiny_adapter, tmp_path):
    """The GGUF source dequantizes and un-permutes each tensor: base.gguf + adapter == folder + adapter."""
    from gguf import GGUFReader

    base = export_gguf(tiny_dir, tmp_path / "base.gguf", outtype="f32", progress=False, echo=None)
    a = export_gguf(base, tmp_path / "a.gguf", adapter=tiny_adapter, outtype="f32", progress=False, echo=None)
    b = export_gguf(tiny_dir, tmp_path / "b.gguf", adapter=tiny_adapter, outtype="f32", progress=False, echo=None)
    ta = {t.name: np.array(t.data) for t in GGUFReader(a).tensors}
    tb = {t.name: np.array(t.data) for t in GGUFReader(b).tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_allclose(ta[name], tb[name], atol=1e-6, rtol=0, err_msg=name)


def test_refuses_to_overwrite_its_input_and_leaves_nothing_on_failure(tiny_dir, tmp_path):
    base = export_gguf(tiny_dir, tmp_path / "base.gguf", outtype="f32", progress=False, echo=None)
    before = base.read_bytes()
    with pytest.raises(ValueError, match="input file"):
        export_gguf(base, base, outtype="f16", progress=False, echo=None)
    assert base.read_bytes() == before
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(tiny_dir, tmp_path / "x.bin", progress=False, echo=None)


def test_adapter_of_another_model_fails_without_a_partial_file(tiny_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.export.conftest import save_adapter

    config = AutoConfig.from_pretrained(tiny_dir)
    config.num_hidden_layers = 3  # the adapter's layer 2 has no base tensor in tiny_dir
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "three")
    adapter = save_adapter(tmp_path / "three", tmp_path / "adapter3")
    with pytest.raises(ValueError, match="match no base model tensor"):
        export_gguf(tiny_dir, tmp_path / "out" / "m.gguf", adapter=adapter, outtype="f32", progress=False, echo=None)
    assert not (tmp_path / "out" / "m.gguf").exists() and not list((tmp_path / "out").glob(".tmp-*"))


def test_qwen2_lora_bias_adapter_merges_like_peft(ids, tmp_path):
    """lora_bias=True on a model with q/k/v biases: the bias of B is merged scaled (PEFT's merge)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from lorakit import LoraConfig, PeftModel, get_peft_model
    from tests.conftest import REPO

    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(  # 448 rows: Qwen2's tokenizer class adds <|endoftext|>
        vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_bias=True,
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    want = logits(PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval(), ids)
    out = export_gguf(tmp_path / "base", tmp_path / "q.gguf", adapter=tmp_path / "adapter", outtype="f32",
                      progress=False, echo=None)
    torch.testing.assert_close(logits(load_back(out), ids), want, atol=1e-5, rtol=0)
