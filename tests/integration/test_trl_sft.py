"""TRL's SFTTrainer with lorakit (``lorakit.integrations.trl.SFTTrainer``): a lorakit model or a
``lorakit.LoraConfig``; packing, completion-only and assistant-only losses; adapter-only saves. TRL + PEFT (plain
``trl.SFTTrainer``) is the oracle for trainable counts and adapter file keys."""

from __future__ import annotations

import os

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig

from lorakit.integrations.trl import SFTTrainer

from ._helpers import LIBS, TINY_TIED, adapter_keys, lib, tiny_base, trainable_count

#: the tiny model's chat template with TRL's {% generation %} markers around assistant turns
ASSISTANT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ message['content'] }}<|end|>{% endgeneration %}{% else %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TIED)


def _prompt_completion() -> Dataset:
    words = ["red", "green", "blue", "black", "white", "pink", "gray", "gold"]
    return Dataset.from_dict({"prompt": [f"the color {w} is" for w in words],
                              "completion": [f" {w} indeed" for w in words]})


def _conversations() -> Dataset:
    return Dataset.from_dict({"messages": [[{"role": "user", "content": f"say {w}"},
                                            {"role": "assistant", "content": f"{w} {w}"}]
                                           for w in ["one", "two", "three", "four"] * 2]})


def _config(out, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), max_steps=1, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, disable_tqdm=True, max_length=48, seed=3,
                bf16=False)  # TRL defaults to bf16 autocast, slow on CPUs without bf16 matmul units
    return SFTConfig(**(base | kw))


def _trainer_for(name: str):
    return SFTTrainer if name == "lorakit" else trl.SFTTrainer


@pytest.mark.parametrize("loss", ["packing_completion_only", "assistant_only"])
def test_sft_with_a_lorakit_model_trains_only_adapters_and_saves_as_peft(loss: str, tmp_path) -> None:
    seen = {}
    for name in LIBS:
        m = lib(name)
        torch.manual_seed(0)
        config = m.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
        model = m.get_peft_model(tiny_base(tied=loss == "assistant_only"), config)
        tokenizer = _tokenizer()
        if loss == "assistant_only":
            tokenizer.chat_template = ASSISTANT_TEMPLATE
            data, cfg = _conversations(), dict(assistant_only_loss=True)
        else:
            data, cfg = _prompt_completion(), dict(packing=True, completion_only_loss=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = _trainer_for(name)(model=model, args=_config(tmp_path / name, **cfg), train_dataset=data,
                                     processing_class=tokenizer)
        assert trainer.model is model
        trainer.train()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all("lora_" in n for n in changed), sorted(changed)[:4]
        ckpt = tmp_path / name / "checkpoint-1"
        seen[name] = (trainable_count(model), adapter_keys(ckpt), "model.safetensors" in os.listdir(ckpt))
    assert seen["lorakit"] == seen["peft"]
    assert seen["lorakit"][2] is False


def test_sft_applies_a_lorakit_config_to_a_model_path(tmp_path) -> None:
    seen = {}
    for name in LIBS:
        m = lib(name)
        config = m.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = _trainer_for(name)(model=str(TINY_TIED), args=_config(tmp_path / name), peft_config=config,
                                     train_dataset=_prompt_completion(), processing_class=_tokenizer())
        assert isinstance(trainer.model, m.PeftModel)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        seen[name] = (trainable_count(trainer.model), adapter_keys(tmp_path / name / "final"))
    assert seen["lorakit"] == seen["peft"]


def test_sft_refuses_a_lorakit_model_with_a_peft_config(tmp_path) -> None:
    from lorakit import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_base(tied=True), config)
    with pytest.raises(ValueError, match="merge_and_unload"):
        SFTTrainer(model=model, args=_config(tmp_path), peft_config=config, train_dataset=_prompt_completion(),
                   processing_class=_tokenizer())


def test_sft_applies_a_lorakit_config_to_a_model_object(tmp_path) -> None:
    from lorakit import LoraConfig, PeftModel

    base = tiny_base(tied=False)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=base, args=_config(tmp_path), peft_config=config, train_dataset=_prompt_completion(),
                         processing_class=_tokenizer())
    assert isinstance(trainer.model, PeftModel) and trainer.model.get_base_model() is base
    assert trainable_count(trainer.model) == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)  # 2 layers x (q, v)
