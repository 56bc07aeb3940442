"""`prepare_run`: every refusal of a run, checked without loading a model (the model path need not exist)."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.config import LoraConfig
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import build_config
from lorakit.train.loop import step_rows
from lorakit.train.plan import prepare_run


def _cfg(tmp_path, lora=None, **training):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    raw = {"model": str(tmp_path / "no-model-here"), "data": {"path": str(tmp_path / "d.jsonl")},
           "lora": {"r": 4, "target_modules": ["q_proj"], **(lora or {})},
           "training": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 2,
                        **training}}
    return build_config(raw)


def _checkpoint(out, step, r=4, **state):
    """A checkpoint folder as the loop writes it, minus the tensors (the plan reads config and state only)."""
    tmp = ckpt.begin(out, step)
    LoraConfig(r=r, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp)
    return ckpt.commit(tmp, {"global_step": step, "world_size": 1, **state})


def test_a_fresh_run_creates_output_dir(tmp_path):
    plan = prepare_run(_cfg(tmp_path))
    assert plan.out_dir.is_dir() and plan.resume_from is None and not plan.earlier
    assert plan.new_adapter is plan.lora and plan.lora.r == 4


def test_refusals_of_the_output_dir(tmp_path, monkeypatch):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ValueError, match="is an existing file; give a folder path"):
        prepare_run(_cfg(tmp_path))
    (tmp_path / "out").unlink()
    _checkpoint(tmp_path / "out", 2)
    with pytest.raises(ValueError, match="already holds a run \\(checkpoint-2\\). Continue it with --resume"):
        prepare_run(_cfg(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ValueError, match="is the model folder"):
        prepare_run(build_config({**_cfg(tmp_path).to_dict(), "model": {"name_or_path": str(tmp_path / "out")}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="fp16=true needs a CUDA GPU"):
        prepare_run(_cfg(tmp_path, fp16=True))


def test_resume_over_a_finished_adapter_without_checkpoint(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished adapter but no checkpoint"):
        prepare_run(_cfg(tmp_path), resume=True)


def test_resume_refuses_another_adapter_or_world_size(tmp_path):
    _checkpoint(tmp_path / "out", 2)
    with pytest.raises(ValueError, match="its adapter differs from this config's \\(r: 8 here vs 4 saved\\)"):
        prepare_run(_cfg(tmp_path, lora={"r": 8}), resume=True)
    with pytest.raises(ValueError, match="world_size=1, this run has 2"):
        prepare_run(_cfg(tmp_path), resume=True, world_size=2)
    plan = prepare_run(_cfg(tmp_path), resume=True)
    assert plan.resume_from.name == "checkpoint-2" and plan.state["global_step"] == 2


def test_schedule_and_the_data_order_of_a_checkpoint(tmp_path):
    plan = prepare_run(_cfg(tmp_path, gradient_accumulation_steps=2))
    sched = plan.schedule(10)  # 5 micro-batches of 2 rows per epoch, 2 per step
    assert (sched.micro_per_epoch, sched.steps_per_epoch, sched.total_steps) == (5, 3, 4)
    with pytest.raises(ValueError, match="1 training rows are fewer than one global batch"):
        plan.schedule(1)
    out = tmp_path / "out"
    _checkpoint(out, 2, **{**sched.data_order, "total_steps": 5})
    resumed = prepare_run(_cfg(tmp_path, gradient_accumulation_steps=2), resume=True)
    with pytest.raises(ValueError, match="total_steps=5, this run has 4"):
        resumed.schedule(10)
    _checkpoint(out, 4, **sched.data_order)
    resumed = prepare_run(_cfg(tmp_path, gradient_accumulation_steps=2), resume=True)
    assert resumed.schedule(10).total_steps == 4 and resumed.finished_summary(4) is None
    (out / "adapter_config.json").write_text("{}")
    (out / "summary.json").write_text(json.dumps({"global_step": 4, "final_train_loss": 1.5}))
    assert resumed.finished_summary(4)["final_train_loss"] == 1.5


def test_step_rows_is_a_pure_function_of_seed_and_step(tmp_path):
    """Each epoch visits every row once (less the dropped tail); two ranks take disjoint halves."""
    sched = prepare_run(_cfg(tmp_path, gradient_accumulation_steps=2)).schedule(11)  # 5 micro-batches of 2
    rows = [{"i": i} for i in range(11)]
    seen = [r["i"] for step in range(sched.steps_per_epoch) for mb in step_rows(rows, sched, 42, step, 0) for r in mb]
    assert len(seen) == len(set(seen)) == 10
    assert step_rows(rows, sched, 42, 1, 0) == step_rows(rows, sched, 42, 1, 0)
    assert step_rows(rows, sched, 42, 3, 0) != step_rows(rows, sched, 43, 3, 0)  # next epoch, other seed


def test_overwrite_refuses_to_delete_an_input_then_clears(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 2)
    (out / "adapter_config.json").write_text("{}")
    cfg = _cfg(tmp_path, overwrite_output_dir=True)
    raw = cfg.to_dict()
    raw["data"]["validation_path"] = str(out / "checkpoint-2")
    with pytest.raises(ValueError, match="data.validation_path=.* lies in .*checkpoint-2"):
        prepare_run(build_config(raw))
    plan = prepare_run(cfg)
    assert (out / "checkpoint-2").is_dir()  # the plan deletes nothing
    plan.clear_earlier_run()
    assert not (out / "checkpoint-2").exists() and not (out / "adapter_config.json").exists()


def test_adapter_name_or_path_must_agree_with_the_lora_section(tmp_path):
    LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path / "ad")
    cfg = _cfg(tmp_path, lora={"r": 8})
    raw = cfg.to_dict()
    raw["model"]["adapter_name_or_path"] = str(tmp_path / "ad")
    with pytest.raises(ValueError, match="brings its own LoRA config, and the lora section differs from it: r: 8"):
        prepare_run(build_config(raw))
    raw["lora"] = {"r": 4}
    plan = prepare_run(build_config(raw))
    assert plan.new_adapter is None and plan.lora.r == 4


def test_notices_for_switches_that_do_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = prepare_run(_cfg(tmp_path, offload_activations=True, eval_steps=1))
    plan.schedule(4, has_eval=False)
    assert any("offload_activations=true does nothing" in n for n in plan.notices)
    assert any("eval_steps=1 is ignored" in n for n in plan.notices)


def test_an_output_dir_without_write_permission_is_one_line(tmp_path, monkeypatch):
    from lorakit.train.lock import RunLock

    def denied(self):  # what os.open raises in a folder of another user (the tests may run as root)
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(RunLock, "_try_acquire", denied)
    with pytest.raises(ValueError, match="training.output_dir=.*out' is not writable: Permission denied"):
        prepare_run(_cfg(tmp_path), lock=True)


def test_data_fingerprint_changes_with_any_token_label_or_order():
    from lorakit.train.plan import data_fingerprint

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    base = data_fingerprint(rows)
    assert data_fingerprint([dict(r) for r in rows]) == base
    assert data_fingerprint(rows[::-1]) != base
    assert data_fingerprint([{**rows[0], "labels": [5, 6, 7]}, rows[1]]) != base  # train_on_inputs
    assert data_fingerprint([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7, 8, 9],
                                                                           "labels": [7, 8, 9]}]) != base  # split moved


def test_resume_refuses_a_checkpoint_of_another_training_method(tmp_path):
    """A DPO checkpoint resumed as SFT (or with another beta) would restore an optimizer and schedule of another
    objective: refused, naming the setting."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')

    def dpo(beta):
        raw = {"model": str(tmp_path / "no-model-here"), "method": "dpo", "preference": {"beta": beta},
               "data": {"path": str(tmp_path / "p.jsonl")}, "lora": {"r": 4, "target_modules": ["q_proj"]},
               "training": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 2}}
        return build_config(raw)

    sched = prepare_run(dpo(0.1)).schedule(10)
    assert sched.data_order["method"] == "dpo"
    _checkpoint(tmp_path / "out", 2, **sched.data_order)
    with pytest.raises(ValueError, match="preference=.*this run has"):
        prepare_run(dpo(0.5), resume=True).schedule(10)
    with pytest.raises(ValueError, match="method='dpo', this run has 'sft'"):
        prepare_run(_cfg(tmp_path), resume=True).schedule(10)
    assert prepare_run(dpo(0.1), resume=True).schedule(10).total_steps == 4
