"""The `lorakit` command: parsing, error messages, inspect, estimate, preprocess, merge, generate, chat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lorakit.cli.generate import parse_adapters, run_chat
from lorakit.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny_model"


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir):
    """A 3-step adapter on the tiny model, trained through `lorakit train`."""
    import yaml

    root = tmp_path_factory.mktemp("adapter")
    cfg = {"model": str(tiny_model_dir), "lora": {"r": 4, "target_modules": "all-linear"},
           "data": {"path": str(REPO / "examples/data/second_word_messages_train.jsonl"), "max_examples": 16},
           "training": {"output_dir": str(root / "out"), "max_steps": 3, "learning_rate": 0.05,
                        "disable_tqdm": True, "report_to": "none", "max_seq_length": 64}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "c.yaml")]) == 0
    return root / "out"


def test_train_reports_config_errors(tmp_path, capsys, tiny_model_dir, config_writer):
    cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    assert main(["train", str(cfg), "training.learnig_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'training.learnig_rate'; did you mean 'learning_rate'" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_parser_verbs():
    parser = build_parser()
    args = parser.parse_args(["train", "c.yaml", "training.max_steps=3", "--resume"])
    assert args.overrides == ["training.max_steps=3"] and args.resume
    args = parser.parse_args(["merge", "--base", "b", "--adapter", "a", "--out", "o", "--dtype", "bf16"])
    assert args.dtype == "bf16"
    assert parse_adapters(["x/ad1", "two=x/ad2"]) == [("ad1", "x/ad1"), ("two", "x/ad2")]
    args, extra = parser.parse_known_args(["train", "c.yaml", "--resume", "training.max_steps=3"])
    assert extra == ["training.max_steps=3"]  # main() adds these to the overrides


def test_adapter_paths_with_equals_signs(tmp_path, monkeypatch):
    (tmp_path / "out/lr=1e-3").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_adapters(["out/lr=1e-3"]) == [("lr=1e-3", "out/lr=1e-3")]  # an existing path
    assert parse_adapters(["a=out/lr=1e-3"]) == [("a", "out/lr=1e-3")]  # split on the first '='
    assert parse_adapters(["other/lr=2e-3"]) == [("lr=2e-3", "other/lr=2e-3")]  # '/' before '=': a path


def test_overrides_after_flags(tmp_path, capsys, monkeypatch):
    import lorakit.train.loop

    seen = {}
    monkeypatch.setattr(lorakit.train.loop, "train", lambda cfg, resume=None: seen.update(cfg=cfg, resume=resume))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: {path: d.jsonl}\n")
    assert main(["train", str(cfg), "training.seed=1", "--resume", "training.max_steps=3"]) == 0
    assert seen["resume"] and seen["cfg"].training.max_steps == 3 and seen["cfg"].training.seed == 1
    with pytest.raises(SystemExit):
        main(["inspect", "m", "extra=1"])


def test_user_errors_print_one_line(tmp_path, capsys, trained_adapter):
    missing = str(tmp_path / "nomodel")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {missing}\ndata: {{path: d.jsonl}}\n")
    for argv in (["preprocess", str(cfg)], ["inspect", missing],
                 ["estimate", missing, "--method", "lora", "--seq-len", "8", "--batch-size", "1"],
                 ["merge", "--base", missing, "--adapter", str(trained_adapter), "--out", str(tmp_path / "m")]):
        assert main(argv) == 2, argv
        assert f"{missing!r} is not a folder" in capsys.readouterr().err
    assert main(["estimate", str(TINY), "--method", "lora", "--seq-len", "8", "--batch-size", "1",
                 "--target", "qproj"]) == 2
    assert "target 'qproj' is not a linear module of this model; allowed: all-linear, attention" in \
        capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\n data: [x\n")
    assert main(["train", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["inspect", str(TINY), "--ranks", "-4"],
                                  ["estimate", str(TINY), "--method", "lora", "--seq-len", "-64", "--batch-size", "2"],
                                  ["estimate", str(TINY), "--method", "lora", "--seq-len", "8", "--batch-size", "0"]])
def test_sizes_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "must be >= 1" in err or "expected one argument" in err  # argparse may read -64 as an option


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_top_p_must_be_a_probability_mass(value, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--base", "x", "--prompt", "hi", "--top-p", value])
    assert f"--top-p must be in (0, 1], got {value}" in capsys.readouterr().err


def test_generation_keeps_a_pad_id_of_zero():
    import argparse
    from types import SimpleNamespace

    from lorakit.cli.generate import _generation_kwargs

    args = argparse.Namespace(max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
    assert _generation_kwargs(args, SimpleNamespace(pad_token_id=0, eos_token_id=2))["pad_token_id"] == 0
    assert _generation_kwargs(args, SimpleNamespace(pad_token_id=None, eos_token_id=2))["pad_token_id"] == 2


def test_oom_advice_is_one_clean_line(tmp_path, capsys, monkeypatch, tiny_model_dir, config_writer):
    import lorakit.train.sft

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lorakit.train.sft.CausalLMLoss, "forward", boom)
    cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("lorakit train: error: out of memory") and "training.bf16=true" in err


def test_inspect_from_config_only(tmp_path, capsys):
    (tmp_path / "config.json").write_text((TINY / "config.json").read_text())  # no weights
    assert main(["inspect", str(tmp_path), "--ranks", "4", "64"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "down_proj" in out
    assert "['q_proj', 'k_proj', 'v_proj', 'o_proj']" in out
    # r * sum(in + out): attention of 4 layers = 4 * (256 + 192 + 192 + 256) = 3584 per unit rank
    assert f"{4 * 3584:,}" in out and f"{64 * 3584:,}" in out


def test_inspect_groups_by_role(capsys):
    """GPT-2 uses c_proj twice: attn.c_proj (64 -> 64, attention) and mlp.c_proj (256 -> 64)."""
    from transformers import GPT2Config

    from lorakit.train.estimate import linear_groups, suggest_target_modules

    with torch.device("meta"):
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32))
    groups = linear_groups(model)
    assert {n: (g.shape, g.is_attention, len(g.paths)) for n, g in groups.items()} == {
        "c_attn": ((64, 192), True, 2), "attn.c_proj": ((64, 64), True, 2),
        "c_fc": ((64, 256), False, 2), "mlp.c_proj": ((256, 64), False, 2)}
    assert suggest_target_modules(groups)["attention"] == ["c_attn", "attn.c_proj"]


def test_estimate_terms(tmp_path, capsys):
    (tmp_path / "config.json").write_text((TINY / "config.json").read_text())
    assert main(["estimate", str(tmp_path), "--method", "lora", "--seq-len", "64", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    for term in ("weights", "adapters", "gradients", "optimizer states", "activations (gradient checkpointing)"):
        assert term in out
    with pytest.raises(SystemExit):
        main(["estimate", str(tmp_path), "--method", "lorra", "--seq-len", "8", "--batch-size", "1"])


def test_preprocess_debug_marks_masked_tokens(tmp_path, capsys, tiny_model_dir, config_writer):
    cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", fmt="messages")
    assert main(["preprocess", str(cfg), "--debug", "--num-examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "train_examples" in out and "(masked)" in out and "label=" in out


def test_merge_loads_in_transformers(tmp_path, trained_adapter, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import PeftModel

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(trained_adapter), "--out", str(out),
                 "--max-shard-size", "20KB"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    AutoTokenizer.from_pretrained(out)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         str(trained_adapter)).eval()
    ids = torch.randint(2, 400, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-5, rtol=1e-5)


def test_generate_and_chat_switch_adapters(trained_adapter, tiny_model_dir, capsys):
    assert main(["generate", "--base", str(tiny_model_dir), "--adapter", f"mine={trained_adapter}",
                 "--prompt", "second word: cat dog", "--max-new-tokens", "4", "--no-stream"]) == 0
    args = build_parser().parse_args(["chat", "--base", str(tiny_model_dir), "--adapter", f"a={trained_adapter}",
                                      "--adapter", f"b={trained_adapter}", "--max-new-tokens", "3"])
    stdin = io.StringIO("/adapters\n/adapter b\nsecond word: cat dog\n/adapter none\nhello\n/quit\n")
    assert run_chat(args, stdin=stdin) == 0
    out = capsys.readouterr().out
    assert "*a, b" in out and "active adapter: b" in out and "active adapter: none" in out
    assert out.count("assistant> ") == 2


def test_summary_of_cli_training(trained_adapter):
    summary = json.loads((trained_adapter / "summary.json").read_text())
    assert summary["global_step"] == 3


def test_merge_never_destroys_inputs_or_user_folders(tmp_path, trained_adapter, tiny_model_dir, capsys,
                                                     monkeypatch):
    import shutil

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    shutil.copytree(trained_adapter, project / "run1")
    base = ["merge", "--base", str(tiny_model_dir), "--adapter", str(project / "run1")]
    assert main([*base, "--out", str(project)]) == 2  # holds the adapter
    assert "holds the adapter" in capsys.readouterr().err
    assert main([*base, "--out", str(project), "--overwrite"]) == 2  # never, even with --overwrite
    assert (project / "notes.txt").read_text() == "precious" and (project / "run1/adapter_config.json").is_file()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    assert main([*base, "--out", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (other / "notes.txt").is_file()

    monkeypatch.chdir(project)
    assert main([*base, "--out", "."]) == 2
    assert "current folder" in capsys.readouterr().err
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "run1"]  # no stray .tmp- folder

    assert main([*base, "--out", "merged"]) == 0  # relative to the current folder
    assert main([*base, "--out", "merged"]) == 0  # an earlier merge output is replaced
    assert (project / "merged/config.json").is_file()
    assert main([*base, "--out", str(other), "--overwrite"]) == 0
    assert not (other / "notes.txt").exists() and (other / "config.json").is_file()
