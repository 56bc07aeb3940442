"""GGUF in: `lorakit.load_model(file.gguf)` and `model.name_or_path: file.gguf` give a plain transformers model
that trains and saves; GGUF in -> train (the real `lorakit train` loop) -> export -> GGUF in round-trips.

The GGUF files are written from a tiny seeded Llama (examples/tiny_model's tokenizer) by lorakit's exporter;
tests/export checks that transformers' own loader reads them to the source model's logits.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from lorakit.export import export_gguf
from tests.conftest import make_tiny_model

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, the same model as an f32 GGUF file in a folder of its own)."""
    folder = make_tiny_model(tmp_path_factory.mktemp("gguf_in_model"))
    gguf_dir = tmp_path_factory.mktemp("gguf_in_file")
    return folder, export_gguf(folder, gguf_dir / "tiny-f32.gguf", outtype="f32", progress=False, echo=None)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(5))


def test_load_model_reads_a_gguf_file_or_its_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, file = tiny
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for path in (file, file.parent):
        model, tokenizer = lorakit.load_model(path)
        assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
        assert getattr(model.config, "quantization_config", None) is None and model.hf_quantizer is None
        assert tokenizer.chat_template and tokenizer.pad_token_id is not None
        torch.testing.assert_close(logits(model, IDS), logits(ref, IDS), atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "saved")  # transformers refuses while the gguf quantization mark is set
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again, IDS), logits(ref, IDS), atol=1e-5, rtol=0)


def test_nf4_on_top_of_a_gguf(tiny):
    from lorakit.quant.linear4bit import Linear4bit

    model, _ = lorakit.load_model(tiny[1], quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert torch.isfinite(logits(model, IDS)).all()


def test_gguf_in_train_export_gguf_in_round_trip(tiny, tmp_path, config_writer):
    """`lorakit train` on the .gguf base, export base.gguf + adapter, load that GGUF: the trained merged model."""
    from lorakit import PeftModel
    from lorakit.train.config import load_config
    from lorakit.train.loop import train

    _, file = tiny
    cfg = config_writer(tmp_path / "c.yaml", file, tmp_path / "run", fmt="messages",
                        lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0})
    train(load_config(cfg))
    base, _ = lorakit.load_model(file)
    want = logits(PeftModel.from_pretrained(base, tmp_path / "run").merge_and_unload(), IDS)
    out = export_gguf(file, tmp_path / "trained.gguf", adapter=tmp_path / "run", outtype="f32", progress=False,
                      echo=None)
    model, _ = lorakit.load_model(out)
    torch.testing.assert_close(logits(model, IDS), want, atol=1e-5, rtol=0)
    assert (logits(model, IDS) - logits(lorakit.load_model(file)[0], IDS)).abs().max() > 1e-3  # training moved it


def write_gguf(path: Path, arch: str, tensor_type: str = "F32") -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.zeros((4, 256 // block * size), dtype=np.uint8) if tensor_type != "F32" else np.zeros((4, 256),
                                                                                                    np.float32)
    writer.add_tensor("token_embd.weight", data, raw_dtype=None if tensor_type == "F32" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_and_tensor_type_are_named(tmp_path):
    with pytest.raises(ValueError, match="architecture 'nosucharch'.*supported: .*llama"):
        lorakit.load_model(write_gguf(tmp_path / "a.gguf", "nosucharch"))
    with pytest.raises(ValueError, match="type Q8_K.*supported: "):
        lorakit.load_model(write_gguf(tmp_path / "b.gguf", "llama", "Q8_K"))


def test_path_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.load_model(tmp_path / "missing.gguf")
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny[1].read_bytes())
    with pytest.raises(ValueError, match="several GGUF files"):
        lorakit.load_model(tmp_path)
