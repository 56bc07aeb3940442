"""`lorakit train` with method: dpo / kto end to end on a tiny seeded Llama: metrics, before/after accuracy,
a run that starts from an adapter (its reference), resume, config refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lorakit.train.config import ConfigError, build_config, load_config
from lorakit.train.loop import train
from tests.conftest import DATA

PAIRS = {"path": str(DATA / "animal_preference_train.jsonl"), "max_examples": 16,
         "validation_path": str(DATA / "animal_preference_eval.jsonl")}
TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(config_writer, tmp_path, model_dir, name, method="dpo", preference=None, **sections):
    out = tmp_path / name
    path = config_writer(tmp_path / f"{name}.yaml", model_dir, out, data={**PAIRS, **sections.pop("data", {})},
                         **sections)
    raw = yaml.safe_load(path.read_text())
    raw.update({"method": method, "preference": preference or {}})
    raw["data"].pop("max_examples") if raw["data"].get("max_examples") is None else None
    path.write_text(yaml.safe_dump(raw))
    return train(load_config(path)), out


def test_dpo_run_logs_trl_metrics_tensorboard_plot_and_accuracy_before_after(config_writer, tmp_path,
                                                                            tiny_model_dir):
    result, out = _run(config_writer, tmp_path, tiny_model_dir, "dpo",
                       training={"eval_steps": 2, "report_to": "all"})
    records = _records(out)
    before = next(r for r in records if r["step"] == 0 and "eval_loss" in r)
    assert before["eval_rewards/accuracies"] == 0.0 and before["eval_rewards/margins"] == 0.0  # policy == reference
    train_logs = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4] and all(k in r for r in train_logs for k in TRL_NAMES)
    assert train_logs[-1]["rewards/margins"] != 0.0
    assert [r["step"] for r in records if "eval_rewards/margins" in r] == [0, 2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preference_accuracy_before"] == before["eval_preference_accuracy"]
    assert summary["preference_accuracy_after"] == records[-1]["eval_preference_accuracy"]
    assert summary["reference"] == "adapter disabled" and summary["chunked_loss"] is True
    assert summary["final_eval_perplexity"] is None  # a preference loss is not a per-token cross-entropy
    assert (out / "loss.png").is_file() and (out / "adapter_model.safetensors").is_file()
    events = "".join(p.read_bytes().decode("latin-1") for p in (out / "runs").glob("events.*"))
    assert "rewards/margins" in events and "eval/rewards/accuracies" in events


def test_dpo_from_an_adapter_uses_it_as_reference_and_resumes_exactly(config_writer, tmp_path, tiny_model_dir):
    """DPO after SFT: the reference is the starting adapter (precomputed), so step 0 has zero rewards although
    the adapter is not the base; a run resumed from checkpoint-2 logs what the uninterrupted run logged."""
    _, sft = _run(config_writer, tmp_path, tiny_model_dir, "sft", method="sft",
                  data={"path": str(DATA / "second_word_prompt_completion_train.jsonl"), "validation_path": None})
    model = {"name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(sft)}
    training = {"save_steps": 2, "logging_steps": 1}
    _, full = _run(config_writer, tmp_path, tiny_model_dir, "full", model=model, training=training,
                   preference={"beta": 0.5})
    records = _records(full)
    assert records[1]["step"] == 0 and records[1]["eval_rewards/margins"] == 0.0
    assert json.loads((full / "summary.json").read_text())["reference"].startswith("precomputed: model.adapter")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    _run(config_writer, tmp_path, tiny_model_dir, "resumed", model=model, preference={"beta": 0.5},
         training={**training, "resume": True})
    def timeless(rs):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]

    assert timeless(_records(resumed)) == timeless(records)  # same losses and reward metrics, to the last bit


def test_kto_run(config_writer, tmp_path, tiny_model_dir):
    kto = tmp_path / "kto.jsonl"
    pairs = [json.loads(line) for line in (DATA / "animal_preference_train.jsonl").read_text().splitlines()[:12]]
    kto.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"],
                                       "label": bool(i % 3)}) + "\n" for i, p in enumerate(pairs)))
    _, out = _run(config_writer, tmp_path, tiny_model_dir, "kto", method="kto",
                  data={"path": str(kto), "validation_path": None, "val_set_size": 4},
                  preference={"desirable_weight": 1.3})
    logs = [r for r in _records(out) if "train_loss" in r]
    assert len(logs) == 4 and all("kl" in r and "rewards/chosen" in r for r in logs)  # 2 of 3 are desirable
    assert any("rewards/margins" in r for r in logs)  # where a batch also held an undesirable completion


def _raw(**extra) -> dict:
    return {"model": "m", "data": {"path": "d.jsonl"}, **extra}


@pytest.mark.parametrize(("raw", "message"), [
    (_raw(method="ppo"), "method: 'ppo' is not allowed; allowed: sft, dpo, orpo, kto, simpo"),
    (_raw(method="dpo", training={"packing": True}), "training.packing does not apply to method: dpo"),
    (_raw(method="dpo", evaluation={"path": "e.jsonl"}), "evaluation.path .* is for method: sft"),
    (_raw(method="orpo", preference={"loss_type": "ipo"}), "preference.loss_type does not apply to method: orpo"),
    (_raw(preference={"beta": 0.2}), "preference.beta does not apply to method: sft"),
    (_raw(method="dpo", preference={"beta": 0}), "preference.beta must be a finite number > 0"),
    (_raw(method="dpo", preference={"label_smoothing": 0.5}), r"preference.label_smoothing must be in \[0, 0.5\)"),
    (_raw(method="dpo", preference={"loss_type": "ipo", "label_smoothing": 0.1}), "applies to loss_type 'sigmoid'"),
    (_raw(method="dpo", preference={"bta": 0.1}), "unknown key 'preference.bta'; did you mean 'beta'"),
])
def test_config_refusals(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_method_override_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw()))
    cfg = load_config(path, ["method=simpo", "preference.simpo_gamma=1.0"])
    assert cfg.method == "simpo" and cfg.preference.simpo_gamma == 1.0
    assert cfg.to_dict()["method"] == "simpo"
