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


def test_cli_commands_take_a_gguf_base(tiny, tmp_path, config_writer, capsys, monkeypatch):
    """preprocess, inspect, estimate and merge accept a .gguf model as they accept a folder: merge dequantizes the
    base, merges, and writes a plain folder whose logits are the merged model's (1e-5, float32)."""
    import json
    import warnings

    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, PeftModel, get_peft_model
    from lorakit.cli.main import main

    folder, file = tiny
    cfg = config_writer(tmp_path / "c.yaml", file, tmp_path / "run", fmt="messages")
    assert main(["preprocess", str(cfg)]) == 0
    assert "train_examples" in capsys.readouterr().out
    assert main(["inspect", str(file)]) == 0
    assert "LlamaForCausalLM, 47,008 parameters" in capsys.readouterr().out
    assert main(["estimate", str(file), "--method", "lora", "--seq-len", "64", "--batch-size", "2"]) == 0
    assert "total with gradient checkpointing" in capsys.readouterr().out

    # an adapter saved on the GGUF base, Hub allowed: no warning (the vocabulary is compared with the file's
    # metadata, not looked up on the Hub as "<path>.gguf/config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    torch.manual_seed(0)
    peft = get_peft_model(lorakit.load_model(file)[0], LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(file)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    want = logits(PeftModel.from_pretrained(lorakit.load_model(file)[0], tmp_path / "adapter").merge_and_unload(), IDS)
    assert main(["merge", "--base", str(file), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged, IDS), want, atol=1e-5, rtol=0)
    assert (want - logits(lorakit.load_model(folder)[0], IDS)).abs().max() > 1e-3  # the adapter is in it
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # from the GGUF's metadata

    assert main(["merge", "--base", str(tmp_path / "nope.gguf"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "m2")]) != 0
    err = capsys.readouterr().err
    assert "GGUF file" in err and "does not exist" in err


def test_fsdp_refuses_a_gguf_base_by_name(tiny, tmp_path, config_writer):
    from lorakit.train.config import load_config
    from lorakit.train.plan import prepare_run

    cfg = config_writer(tmp_path / "c.yaml", tiny[1], tmp_path / "run", training={"distributed": "fsdp"})
    with pytest.raises(NotImplementedError, match=r"fsdp with a GGUF model .*model\.save_pretrained\(folder\)"):
        prepare_run(load_config(cfg), world_size=2)
