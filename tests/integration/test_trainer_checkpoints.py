"""transformers' Trainer with a lorakit model (``lorakit.integrations.transformers.Trainer``): adapter-only
checkpoints in PEFT's layout, resume, best-model reload, checkpointing and 4-bit bases. PEFT + the plain
transformers Trainer is the oracle for file names, file keys and trainable counts."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import transformers
from transformers import TrainingArguments

from lorakit.integrations.transformers import Trainer as LorakitTrainer

from ._helpers import LIBS, adapter_keys, adapter_tensors, lib, tiny_base, token_dataset, trainable_count

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, disable_tqdm=True, seed=7, data_seed=7)
    return TrainingArguments(**(base | kw))


def _model(name: str, tied: bool, dropout: float = 0.0):
    m = lib(name)
    torch.manual_seed(0)
    return m.get_peft_model(tiny_base(tied), m.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          lora_dropout=dropout, task_type="CAUSAL_LM"))


def _trainer(name: str):
    return LorakitTrainer if name == "lorakit" else transformers.Trainer


def _files(folder) -> set[str]:
    return set(os.listdir(folder))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_checkpoints_and_save_model_are_adapter_only_as_peft(tied: bool, tmp_path) -> None:
    seen = {}
    for name in LIBS:
        model = _model(name, tied)
        trainer = _trainer(name)(model=model, args=_args(tmp_path / name), train_dataset=token_dataset())
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        ckpt = tmp_path / name / "checkpoint-2"
        seen[name] = (_files(ckpt), adapter_keys(ckpt), _files(tmp_path / name / "final"),
                      adapter_keys(tmp_path / name / "final"), trainable_count(model))
    lk, pf = seen["lorakit"], seen["peft"]
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= lk[0]
    assert "model.safetensors" not in lk[0] | lk[2]
    assert lk[0] == pf[0] and lk[2] == pf[2]  # the same files as PEFT writes, README.md included
    assert lk[1] == pf[1] and lk[3] == pf[3]  # the same tensor keys
    assert lk[4] == pf[4]


def test_resume_from_checkpoint_true_equals_an_uninterrupted_run(tmp_path) -> None:
    out = tmp_path / "run"
    model = _model("lorakit", tied=False, dropout=0.1)  # dropout: the resumed run must restore the RNG too
    LorakitTrainer(model=model, args=_args(out), train_dataset=token_dataset()).train()
    straight = adapter_tensors(out / "checkpoint-4")
    shutil.rmtree(out / "checkpoint-4")  # as if the run had been killed after checkpoint-2

    resumed = _model("lorakit", tied=False, dropout=0.1)
    LorakitTrainer(model=resumed, args=_args(out), train_dataset=token_dataset()).train(resume_from_checkpoint=True)
    after = adapter_tensors(out / "checkpoint-4")
    assert after.keys() == straight.keys()
    first = adapter_tensors(out / "checkpoint-2")
    assert any(not torch.equal(first[k], after[k]) for k in after)  # steps 3-4 did train
    for key in straight:
        torch.testing.assert_close(after[key], straight[key], rtol=0, atol=1e-6)


def test_load_best_model_at_end_reloads_the_best_adapter(tmp_path) -> None:
    model = _model("lorakit", tied=False)
    args = _args(tmp_path, save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=True)  # the WORST loss: an early checkpoint
    data = token_dataset()
    trainer = LorakitTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")
    saved = adapter_tensors(best)
    state = {k.replace(".adapters.default.", "."): v for k, v in model.state_dict().items()}
    for key, tensor in saved.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0)
    assert any(p.requires_grad for p in model.parameters())  # still trainable, as with PEFT


def test_gradient_checkpointing_on_a_4bit_base_saves_adapter_only(tmp_path) -> None:
    from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize_model

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = prepare_model_for_kbit_training(quantize_model(tiny_base(tied=True), bnb))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = _args(tmp_path, max_steps=2, gradient_checkpointing=True)
    LorakitTrainer(model=model, args=args, train_dataset=token_dataset()).train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.endswith("lora_B.weight"))
    files = _files(tmp_path / "checkpoint-2")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert all(".lora_" in k for k in adapter_keys(tmp_path / "checkpoint-2"))
