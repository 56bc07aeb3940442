"""TRL's DPOTrainer with lorakit (``lorakit.integrations.trl.DPOTrainer``): the reference is the policy itself
(adapters disabled, or a frozen ``ref`` copy of a passed adapter, as TRL does for PEFT models), never a second
model. TRL + PEFT (plain ``trl.DPOTrainer``) is the oracle for trainable counts and checkpoint files / keys."""

from __future__ import annotations

import os

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

from lorakit.integrations.trl import DPOTrainer, ReferenceModel

from ._helpers import LIBS, TINY_TIED, adapter_keys, lib, tiny_base, trainable_count


def _pairs() -> Dataset:
    return Dataset.from_dict({"prompt": ["the sky is", "grass is", "snow is", "coal is"],
                              "chosen": [" blue", " green", " white", " black"],
                              "rejected": [" green", " blue", " black", " white"]})


def _config(out, **kw) -> DPOConfig:
    base = dict(output_dir=str(out), max_steps=1, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, disable_tqdm=True, bf16=False, seed=5)  # bf16: slow on CPU
    return DPOConfig(**(base | kw))


def test_dpo_with_a_lorakit_model_trains_against_a_frozen_copy_of_its_adapter(tmp_path) -> None:
    seen = {}
    for name in LIBS:
        m = lib(name)
        torch.manual_seed(0)
        model = m.get_peft_model(tiny_base(tied=False), m.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    task_type="CAUSAL_LM"))
        trainer_class = DPOTrainer if name == "lorakit" else trl.DPOTrainer
        trainer = trainer_class(model=model, args=_config(tmp_path / name), train_dataset=_pairs(),
                                processing_class=AutoTokenizer.from_pretrained(TINY_TIED))
        if name == "lorakit":
            assert isinstance(trainer.ref_model, ReferenceModel) and not list(trainer.ref_model.parameters())
            assert trainer.model is model
            ref_before = {n: p.clone() for n, p in model.named_parameters() if ".adapters.ref." in n}
        trainer.train()
        if name == "lorakit":
            assert ref_before and all(torch.equal(p, ref_before[n]) for n, p in model.named_parameters()
                                      if n in ref_before)
        ckpt = tmp_path / name / "checkpoint-1"
        seen[name] = (trainable_count(model), sorted(model.peft_config), adapter_keys(ckpt),
                      adapter_keys(ckpt / "ref"), sorted(os.listdir(ckpt / "ref")))
    assert seen["lorakit"] == seen["peft"]


def test_dpo_with_a_lorakit_config_uses_the_base_model_as_reference(tmp_path) -> None:
    from lorakit import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=str(TINY_TIED), args=_config(tmp_path), peft_config=config, train_dataset=_pairs(),
                         processing_class=AutoTokenizer.from_pretrained(TINY_TIED))
    policy = trainer.model
    assert isinstance(trainer.ref_model, ReferenceModel) and list(policy.peft_config) == ["default"]
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    labels = ids.clone()
    with torch.no_grad():
        ref = trainer.ref_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs  # (1, T-1)
        pol = policy(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        base_logits = AutoModelForCausalLM.from_pretrained(TINY_TIED)(input_ids=ids).logits  # (1, T, V)
    expected = torch.log_softmax(base_logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)  # fp32 CPU, chunked vs full softmax
    assert not torch.allclose(pol, expected, atol=1e-3)  # the adapter (B != 0) does change the policy
    trainer.train()
    assert not any(".adapters.ref." in n for n, _ in policy.named_parameters())
