"""Command-line behaviour a new user meets: Ctrl-C, options that only apply to some methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli.main import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny_model"


def _interrupt_after(checkpoint: Path | None):
    """A stand-in for `train` that writes `checkpoint` (if given) and is then interrupted (Ctrl-C)."""

    def fake_train(cfg, resume=None):
        if checkpoint is not None:
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        raise KeyboardInterrupt

    return fake_train


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_ctrl_c_in_train_prints_how_to_resume(tmp_path, capsys, monkeypatch, with_checkpoint):
    import lorakit.train.loop

    out = tmp_path / "out"
    monkeypatch.setattr(lorakit.train.loop, "train", _interrupt_after(out / "checkpoint-2" if with_checkpoint
                                                                      else None))
    monkeypatch.delenv("LORAKIT_TRACEBACK", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: m\ndata: {{path: d.jsonl}}\ntraining: {{output_dir: {out}, save_steps: 2}}\n")
    assert main(["train", str(cfg), "training.seed=3"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("lorakit train: interrupted")
    if with_checkpoint:
        assert str(out / "checkpoint-2") in err and f"lorakit train {cfg} training.seed=3 --resume" in err
    else:
        assert "nothing to resume" in err


def test_ctrl_c_elsewhere_is_one_line(capsys, monkeypatch):
    import lorakit.cli.inspect

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakit.cli.inspect, "inspect_model", interrupted)
    monkeypatch.delenv("LORAKIT_TRACEBACK", raising=False)
    assert main(["inspect", str(TINY)]) == 130
    assert capsys.readouterr().err == "lorakit inspect: interrupted\n"


@pytest.mark.parametrize(("method", "flags", "named"), [
    ("lora", ["--double-quant"], "--double-quant"),
    ("full", ["--double-quant"], "--double-quant"),
    ("full", ["--r", "64"], "--r"),
    ("full", ["--target", "q_proj"], "--target"),
])
def test_estimate_refuses_flags_its_method_ignores(capsys, method, flags, named):
    """These flags used to change nothing, with the same report printed as without them."""
    assert main(["estimate", str(TINY), "--method", method, "--seq-len", "8", "--batch-size", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit estimate: error: {named} does not apply to --method {method}")


def test_estimate_defaults_and_applicable_flags(capsys):
    args = ["estimate", str(TINY), "--seq-len", "8", "--batch-size", "1"]
    assert main([*args, "--method", "lora"]) == 0
    assert "r=16 target=all-linear" in capsys.readouterr().out
    assert main([*args, "--method", "qlora", "--double-quant", "--r", "8", "--target", "attention"]) == 0
    assert "r=8 target=attention" in capsys.readouterr().out
    assert main([*args, "--method", "full"]) == 0


def test_train_usage_names_only_the_config_as_required(capsys):
    for verb in ("train", "preprocess"):
        with pytest.raises(SystemExit):
            main([verb])
        assert capsys.readouterr().err.rstrip().endswith("the following arguments are required: config")


def test_merge_checks_the_shard_size_before_loading(capsys):
    """A bad --max-shard-size failed after the model was loaded and merged, with 'Unit 'XB' not supported'."""
    with pytest.raises(SystemExit):
        main(["merge", "--base", "b", "--adapter", "a", "--out", "o", "--max-shard-size", "10XB"])
    assert "argument --max-shard-size: '10XB' is not a size like 500MB" in capsys.readouterr().err
    from lorakit.cli.common import shard_size

    assert [shard_size(s) for s in ("2GB", "500mb", "1.5GB", "100KB")] == ["2GB", "500mb", "1.5GB", "100KB"]


def test_missing_adapter_folders_fail_before_any_loading(tmp_path, capsys, monkeypatch):
    """generate asked the Hub (five retries, ~25 s) for a mistyped local adapter folder after loading the base."""
    import lorakit.train.evaluate

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(lorakit.train.evaluate, "load_base_model", never)
    monkeypatch.chdir(tmp_path)
    for spec in ("missingdir", "./runs/x", str(tmp_path / "gone")):
        assert main(["generate", "--base", str(TINY), "--adapter", spec, "--prompt", "hi"]) == 2
        assert f"--adapter {spec!r}: no such folder" in capsys.readouterr().err
    assert main(["merge", "--base", str(TINY), "--adapter", "missingdir", "--out", "m"]) == 2
    assert "--adapter 'missingdir': no such folder" in capsys.readouterr().err


def test_a_missing_local_model_path_is_not_asked_of_the_hub():
    from lorakit.train.evaluate import model_path_errors

    for path in ("./models/llama", "/nowhere/llama", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"model '{path}' is not a folder"):
            with model_path_errors(path):
                raise AssertionError("transformers would have been called")


def test_an_adapter_folder_given_as_the_model_is_refused(tmp_path, capsys):
    """transformers loads an adapter folder as a model by attaching it to its base through PEFT, so `train` put a
    second, lorakit adapter on top of a PEFT one (twice the trainable parameters) and inspect spoke of a missing
    model_type."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(TINY), "r": 4}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {adapter}\ndata: {{path: {REPO}/examples/data/second_word_text_train.jsonl}}\n"
                   f"training: {{output_dir: {tmp_path / 'out'}}}\n")
    for argv in (["train", str(cfg)], ["inspect", str(adapter)], ["generate", "--base", str(adapter), "--prompt", "x"],
                 ["merge", "--base", str(adapter), "--adapter", str(adapter), "--out", str(tmp_path / "m")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is an adapter folder (adapter_config.json, no config.json), not a model" in err, argv
        assert f"give its base model ({str(TINY)!r})" in err


def test_a_model_without_a_causal_lm_class_is_one_short_line(tmp_path, capsys):
    """A T5 folder printed transformers' list of ~250 config classes."""
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=50).save_pretrained(tmp_path)
    for argv in (["inspect", str(tmp_path)], ["estimate", str(tmp_path), "--method", "lora", "--seq-len", "8",
                                              "--batch-size", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "has a T5Config, which has no causal-LM class in transformers" in err
        assert len(err) < 300 and "LlamaConfig" not in err


def test_a_damaged_adapter_file_is_one_line(tmp_path, capsys):
    """A truncated adapter_model.safetensors printed safetensors' traceback (SafetensorError)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(TINY)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata")
    for argv in (["generate", "--base", str(TINY), "--adapter", str(adapter), "--prompt", "x"],
                 ["merge", "--base", str(TINY), "--adapter", str(adapter), "--out", str(tmp_path / "m")]):
        assert main(argv) == 2, argv
        assert f"--adapter {str(adapter)!r}: its safetensors file is damaged or incomplete" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_sampling_flags_without_do_sample_are_refused(verb, capsys, monkeypatch):
    """--temperature / --top-p / --top-k were ignored silently: decoding is greedy without --do-sample."""
    import lorakit.train.evaluate

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(lorakit.train.evaluate, "load_base_model", never)
    prompt = ["--prompt", "hi"] if verb == "generate" else []
    assert main([verb, "--base", str(TINY), *prompt, "--temperature", "0.5"]) == 2
    assert "--temperature only applies when sampling" in capsys.readouterr().err
    assert main([verb, "--base", str(TINY), *prompt, "--top-p", "0.5", "--top-k", "3"]) == 2
    assert "--top-p and --top-k only apply when sampling" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--temperature", "0", "argument --temperature: must be > 0, got 0"),
    ("--repetition-penalty", "-1", "argument --repetition-penalty: must be > 0, got -1"),
    ("--top-k", "-5", "argument --top-k: must be >= 0, got -5"),
])
def test_generation_numbers_are_checked_before_loading(flag, value, message, capsys):
    """transformers refused these after loading, naming `penalty` or `top_k` rather than the flag."""
    with pytest.raises(SystemExit):
        main(["generate", "--base", "b", "--prompt", "hi", "--do-sample", f"{flag}={value}"])
    assert message in capsys.readouterr().err


def test_sampling_defaults_and_given_values():
    import argparse
    from types import SimpleNamespace

    from lorakit.cli.generate import _generation_kwargs

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    args = argparse.Namespace(max_new_tokens=4, do_sample=True, repetition_penalty=1.0, temperature=None, top_p=0.9,
                              top_k=None)
    kwargs = _generation_kwargs(args, tok)
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (1.0, 0.9, 50)


def test_preprocess_checks_the_evaluation_file(tmp_path, capsys, tiny_model_dir, config_writer):
    """preprocess ignored the evaluation section; an unusable evaluation.path surfaced only in `train`."""
    data = REPO / "examples" / "data"
    cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", fmt="messages",
                        evaluation={"path": str(data / "second_word_messages_eval.jsonl"), "max_examples": 5})
    assert main(["preprocess", str(cfg)]) == 0
    assert "exact_match_prompts          5" in capsys.readouterr().out
    assert main(["preprocess", str(cfg), f"evaluation.path={data / 'second_word_alpaca_eval.jsonl'}"]) == 2
    assert "holds 'alpaca' records, the training data 'messages' ones" in capsys.readouterr().err


@pytest.mark.parametrize("killed", ["between-renames", "while-deleting", "while-writing"])
def test_a_killed_merge_leaves_nothing_behind_for_the_next_one(tmp_path, killed):
    """`.tmp-merged` (half written) is deleted; `.old-merged` (the earlier output moved aside for the swap) is put
    back when `merged` is missing, else deleted: the next merge into `merged` never finds a stray folder."""
    from lorakit.cli.merge import clean_killed_merge

    out, tmp, old = tmp_path / "merged", tmp_path / ".tmp-merged", tmp_path / ".old-merged"
    if killed == "between-renames":
        old.mkdir()
        (old / "config.json").write_text("earlier")
        tmp.mkdir()
    elif killed == "while-deleting":
        out.mkdir()
        (out / "config.json").write_text("new")
        old.mkdir()
    else:
        out.mkdir()
        (out / "config.json").write_text("earlier")
        tmp.mkdir()
    clean_killed_merge(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (out / "config.json").read_text() == ("new" if killed == "while-deleting" else "earlier")
