"""End-to-end training on a tiny seeded Llama: outputs, PEFT parity, resume, formats, DDP, QLoRA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train.config import load_config
from lorakit.train.loop import train

REPO = Path(__file__).resolve().parents[2]


def _losses(out: Path, key: str = "train_loss") -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def _run(config_writer, tmp_path, model_dir, name="run", fmt="prompt_completion", overrides=(), **sections):
    out = tmp_path / name
    path = config_writer(tmp_path / f"{name}.yaml", model_dir, out, fmt=fmt, **sections)
    return train(load_config(path, list(overrides))), out


def test_train_outputs_and_peft_loads_same_logits(config_writer, tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    result, out = _run(config_writer, tmp_path, tiny_model_dir,
                       training={"save_steps": 2, "save_total_limit": 1, "eval_steps": 2,
                                 "lr_scheduler_type": "cosine", "warmup_ratio": 0.25})
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "train_config.yaml",
                 "metrics.jsonl", "summary.json", "loss.png"):
        assert (out / name).is_file(), name
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]  # save_total_limit=1
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    assert sorted(_losses(out, "eval_loss")) == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert result.eval_loss == pytest.approx(summary["final_eval_loss"])

    weights = load_file(out / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in weights)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # B moved away from zero

    ids = torch.randint(2, 400, (2, 12))
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)  # fp32 reorderings


def test_resume_reproduces_uninterrupted_run(config_writer, tmp_path, tiny_model_dir):
    """Resume from checkpoint-2 of a 4-step run (lora_dropout > 0, so the RNG state matters); the log line of
    step 3 averages steps 1-3, so the logging window must come back from the checkpoint too."""
    training = {"save_steps": 2, "logging_steps": 3}
    _, full = _run(config_writer, tmp_path, tiny_model_dir, "full", training=training)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")  # holds steps 3-4 too, as after a kill
    (resumed / ".tmp-checkpoint-4").mkdir()  # a half-written checkpoint
    _run(config_writer, tmp_path, tiny_model_dir, "resumed", training={**training, "resume": True})
    assert sorted(_losses(full)) == [3, 4]
    assert _losses(resumed) == _losses(full)  # exactly: same data order, RNG, optimizer and schedule state
    tokens = [json.loads((d / "checkpoint-4/trainer_state.json").read_text())["tokens_seen"] for d in (full, resumed)]
    assert tokens[0] == tokens[1] > 0
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (resumed / ".tmp-checkpoint-4").exists()


def test_output_dir_of_an_earlier_run_is_not_reused_silently(config_writer, tmp_path, tiny_model_dir):
    """A new run refuses an output_dir holding a run; --resume refuses a checkpoint of another config."""
    _, out = _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 4, "save_steps": 2})
    with pytest.raises(ValueError, match="already holds a run .*--resume"):
        _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 2, "save_steps": 1})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # untouched
    shutil.rmtree(out / "checkpoint-4")  # resume point: checkpoint-2
    with pytest.raises(ValueError, match="total_steps=4, this run has 3"):
        _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 3, "save_steps": 2, "resume": True})
    with pytest.raises(ValueError, match="r: 8 here vs 4 saved"):  # checked before the model loads
        _run(config_writer, tmp_path, tiny_model_dir, lora={"r": 8},
             training={"max_steps": 4, "save_steps": 2, "resume": True})
    with pytest.raises(ValueError, match="learning_rate=.*this run has 0.123 .*model.adapter_name_or_path="):
        _run(config_writer, tmp_path, tiny_model_dir,
             training={"max_steps": 4, "save_steps": 2, "resume": True, "learning_rate": 0.123})
    state_file = out / "checkpoint-2/trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ValueError, match="world_size=2, this run has 1"):
        _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 4, "save_steps": 2, "resume": True})
    model = {"name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out / "checkpoint-2")}
    with pytest.raises(ValueError, match="model.adapter_name_or_path=.* lies in .*checkpoint-2.* deletes"):
        _run(config_writer, tmp_path, tiny_model_dir, model=model,
             training={"max_steps": 2, "save_steps": 1, "overwrite_output_dir": True})
    assert (out / "checkpoint-2" / "adapter_config.json").is_file()  # nothing deleted
    _run(config_writer, tmp_path, tiny_model_dir,
         training={"max_steps": 2, "save_steps": 1, "overwrite_output_dir": True})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2


def test_output_dir_that_is_a_file(config_writer, tmp_path, tiny_model_dir):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        _run(config_writer, tmp_path, tiny_model_dir)


def test_adapter_name_or_path_refuses_a_differing_lora_section(config_writer, tmp_path, tiny_model_dir):
    _, first = _run(config_writer, tmp_path, tiny_model_dir, "first", training={"max_steps": 1})
    model = {"name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(first)}
    with pytest.raises(ValueError, match="lora section differs from it: r: 8 here vs 4 saved"):
        _run(config_writer, tmp_path, tiny_model_dir, "second", model=model, lora={"r": 8})
    with pytest.raises(ValueError, match="target_modules: \\['q_proj'\\] selects 2 modules"):
        _run(config_writer, tmp_path, tiny_model_dir, "second", model=model, lora={"target_modules": ["q_proj"]})
    _run(config_writer, tmp_path, tiny_model_dir, "second", model=model, training={"max_steps": 1})  # same values


def test_quantized_run_passes_the_model_options_to_its_loader(config_writer, tmp_path, tiny_model_dir):
    """attn_implementation reaches the quantized loader: an unavailable one fails as without quantization."""
    model = {"name_or_path": str(tiny_model_dir), "attn_implementation": "flash_attention_2"}
    with pytest.raises(ImportError, match="FlashAttention2"):
        _run(config_writer, tmp_path, tiny_model_dir, model=model, overrides=["quantization=nf4"])


def test_ignored_switches_are_reported(config_writer, tmp_path, tiny_model_dir, capsys):
    cfg_path = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "run",
                             training={"max_steps": 1, "eval_steps": 1, "offload_activations": True})
    cfg = load_config(cfg_path, ["data.validation_path=null"])
    train(cfg)
    out = capsys.readouterr().out
    assert "training.eval_steps=1 is ignored: there is no eval data" in out
    if not torch.cuda.is_available():
        assert "training.offload_activations=true does nothing here" in out


def test_int8_run(config_writer, tmp_path, tiny_model_dir):
    """`quantization: int8` with the default llm_int8_threshold (6.0) trains."""
    result, out = _run(config_writer, tmp_path, tiny_model_dir, overrides=["quantization=int8"],
                       training={"max_steps": 1})
    assert result.train_loss is not None and (out / "adapter_model.safetensors").is_file()


def test_loss_is_token_normalized_across_accumulation(config_writer, tmp_path, tiny_model_dir):
    """bs 4 x accum 2 and bs 8 x accum 1 see the same 8 examples per step: same loss and update."""
    no_dropout = {"lora_dropout": 0.0}
    _, a = _run(config_writer, tmp_path, tiny_model_dir, "a", lora=no_dropout,
                training={"max_steps": 2, "per_device_train_batch_size": 8})
    _, b = _run(config_writer, tmp_path, tiny_model_dir, "b", lora=no_dropout,
                training={"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})
    for step, loss in _losses(a).items():
        assert _losses(b)[step] == pytest.approx(loss, rel=1e-5)
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "alpaca", "text"])
def test_every_data_format_end_to_end(config_writer, tmp_path, tiny_model_dir, fmt):
    result, out = _run(config_writer, tmp_path, tiny_model_dir, fmt=fmt,
                       training={"max_steps": 2, "max_seq_length": 256})  # alpaca: ~180 tokens
    assert result.train_loss is not None and result.eval_loss is not None
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["data_format"] == fmt


@pytest.mark.slow
def test_packing_runs(config_writer, tmp_path, tiny_model_dir):
    result, _ = _run(config_writer, tmp_path, tiny_model_dir, training={"packing": True, "max_steps": 2})
    assert result.train_loss is not None


@pytest.mark.slow
def test_resume_after_kill_9(config_writer, tmp_path, tiny_model_dir):
    """Kill -9 a `lorakit train` process after its first checkpoint, `--resume`, compare to a full run."""
    training = {"max_steps": 8, "save_steps": 2}
    _, full = _run(config_writer, tmp_path, tiny_model_dir, "full", training=training)
    out = tmp_path / "killed"
    cfg = config_writer(tmp_path / "killed.yaml", tiny_model_dir, out, training=training)
    cmd = [sys.executable, "-m", "lorakit.cli.main", "train", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    subprocess.run([*cmd, "--resume"], check=True, capture_output=True)
    assert _losses(out) == _losses(full)
    a, b = load_file(full / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(config_writer, tmp_path, tiny_model_dir):
    """2 processes x batch 2 (gloo, CPU) == 1 process x batch 4: same global batches, same adapter.

    Tolerance 1e-5: the two runs sum the same per-token losses and gradients in a different order
    (all-reduce), which moves fp32 results by a few ulps per step.
    """
    common = {"max_steps": 3, "save_steps": None}
    _, one = _run(config_writer, tmp_path, tiny_model_dir, "one", lora={"lora_dropout": 0.0},
                  training={**common, "per_device_train_batch_size": 4})
    two = tmp_path / "two"
    cfg = config_writer(tmp_path / "two.yaml", tiny_model_dir, two, lora={"lora_dropout": 0.0},
                        training={**common, "per_device_train_batch_size": 2})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    subprocess.run([*torchrun, "-m", "lorakit.cli.main", "train", str(cfg)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=1e-5)
    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_qlora_nf4_run(config_writer, tmp_path, tiny_model_dir):
    pytest.importorskip("lorakit.quant.load")
    result, out = _run(config_writer, tmp_path, tiny_model_dir, overrides=["quantization.method=nf4"],
                       training={"max_steps": 3})
    assert result.train_loss is not None and (out / "adapter_model.safetensors").is_file()


def test_memory_switches_keep_the_loss_curve(config_writer, tmp_path, tiny_model_dir):
    """gradient_checkpointing, fused_lora and offload_activations change memory, not the maths (fp32, no dropout)."""
    no_dropout = {"lora_dropout": 0.0}
    _, plain = _run(config_writer, tmp_path, tiny_model_dir, "plain", lora=no_dropout, training={"max_steps": 2})
    switches = {"max_steps": 2, "gradient_checkpointing": True, "fused_lora": True, "offload_activations": True}
    _, fast = _run(config_writer, tmp_path, tiny_model_dir, "fast", lora=no_dropout, training=switches)
    assert len(_losses(plain)) == 2
    for step, loss in _losses(plain).items():
        assert _losses(fast)[step] == pytest.approx(loss, rel=1e-5)
    wa, wb = load_file(plain / "adapter_model.safetensors"), load_file(fast / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_exact_match_before_and_after_training(config_writer, tmp_path, tiny_model_dir, capsys):
    """evaluation.path: the score before training, then after, from the adapter reloaded from disk."""
    evaluation = {"path": str(REPO / "examples/data/second_word_prompt_completion_eval.jsonl"), "max_examples": 4,
                  "answer_field": "completion", "max_new_tokens": 2, "generate_samples": 1}
    result, out = _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 1}, evaluation=evaluation)
    printed = capsys.readouterr().out
    assert "exact match BEFORE training" in printed and "exact match AFTER training" in printed
    assert printed.count("    generated ") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["exact_match_after"] <= 1.0 and summary["exact_match_before"] == result.summary[
        "exact_match_before"]


def test_a_second_run_with_another_precision_in_one_process_is_refused_clearly(config_writer, tmp_path,
                                                                                tiny_model_dir):
    """accelerate keeps the first run's mixed precision for the life of the process (a notebook): the second run
    with training.bf16 says to use a new process, instead of accelerate's advice about `Accelerator()`."""
    train(load_config(config_writer(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", training={"max_steps": 1})))
    cfg = config_writer(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", training={"max_steps": 1, "bf16": True})
    with pytest.raises(ValueError, match=r"already trained with another precision .* `lorakit train CONFIG`"):
        train(load_config(cfg))
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerates_own_sharding_engines_are_refused_by_name(config_writer, tmp_path, tiny_model_dir, monkeypatch,
                                                              flag):
    """`accelerate launch` with an FSDP / DeepSpeed config sets these variables; on CPU accelerate then silently
    stays DDP and on GPUs it would wrap the model a second way: train says which YAML key shards instead."""
    monkeypatch.setenv(flag, "true")
    cfg = config_writer(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", training={"max_steps": 1})
    with pytest.raises(ValueError, match=r"accelerate's (FSDP|DeepSpeed) .*training.distributed: fsdp"):
        train(load_config(cfg))
    assert not (tmp_path / "a").exists()
