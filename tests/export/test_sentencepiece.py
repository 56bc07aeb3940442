"""SentencePiece tokenizers (Llama 2, Mistral 7B, TinyLlama) in GGUF export: llama.cpp's ``llama`` vocabulary
(pieces, scores, types from ``tokenizer.model``), as its converter writes it.

The tokenizer is a SentencePiece BPE model trained here on examples/data (byte fallback, 400 pieces) plus one added
special token; transformers' GGUF loader (the oracle) must rebuild a tokenizer that encodes as the source does.
The opt-in llama.cpp check (``-m slow``) is the last test.
"""

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.export import export_gguf

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[2]
TEXTS = ["Hello world, what is the second word? 12345 ünïcode 🦙", "  leading spaces\nand newlines\t tabs",
         "<|tool|> call it</s>", "The animal: cat dog"]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose tokenizer is SentencePiece BPE (tokenizer.model + tokenizer.json), vocab 401 + 3 rows."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("spm_model")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(line for f in sorted((REPO / "examples" / "data").glob("*.jsonl"))
                                for line in f.read_text().splitlines()[:300]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TEMPLATE}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_sentencepiece_vocabulary_round_trips_through_transformers_gguf_loader(spm_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.export.gguf_read import GGUFFile

    out = export_gguf(spm_model, tmp_path / "m.gguf", outtype="f32", progress=False, echo=None)
    meta = GGUFFile(out).metadata
    sp = spm.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == 404
    assert meta["tokenizer.ggml.scores"][300] == pytest.approx(sp.get_score(300))  # a merged piece's score
    types = meta["tokenizer.ggml.token_type"]
    assert types[1] == 3 and types[400] == 3 and types[3] == 6 and types[300] == 1 and types[403] == 5
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.chat_template"] == TEMPLATE
    source = AutoTokenizer.from_pretrained(spm_model)
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        assert back.encode(text) == source.encode(text), text
    ids = torch.tensor([source.encode(TEXTS[0])])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(spm_model, dtype=torch.float32)(ids).logits
        got = lorakit.load_model(out)[0](ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_sentencepiece_tokenizer_without_its_model_file_is_refused(spm_model, tmp_path):
    import shutil

    folder = tmp_path / "no_spm"
    shutil.copytree(spm_model, folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(NotImplementedError, match="needs its tokenizer.model"):
        export_gguf(folder, tmp_path / "m.gguf", progress=False, echo=None)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_transformers(spm_model, tmp_path):
    """llama.cpp on the exported vocabulary gives transformers' ids for ordinary text. It differs by design where
    its SentencePiece tokenizer puts its space prefix: text that starts with spaces, or follows a special token
    (as for its own conversion of any Llama 2 / Mistral model), so those texts are left out."""
    from transformers import AutoTokenizer

    from tests.conftest import llama_cpp_module

    llama_cpp = llama_cpp_module(tmp_path)
    out = export_gguf(spm_model, tmp_path / "m.gguf", outtype="f32", progress=False, echo=None)
    source = AutoTokenizer.from_pretrained(spm_model)
    llama = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    for text in [TEXTS[0], TEXTS[3], "Mixed: <|tool|>", "a\nb\tc  d"]:
        assert llama.tokenize(text.encode(), add_bos=True, special=True) == source.encode(text), text
