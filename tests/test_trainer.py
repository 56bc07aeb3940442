"""transformers' Trainer trains a lorakit PeftModel (16-bit and 4-bit bases, gradient checkpointing on)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize_model

from .conftest import make_tiny_llama


@pytest.mark.parametrize("quantized", [False, True])
def test_trainer_trains_only_adapters(quantized: bool, tmp_path) -> None:
    base = make_tiny_llama(hidden=64)
    if quantized:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = prepare_model_for_kbit_training(quantize_model(base, bnb))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(2, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        gradient_checkpointing=True, use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (".adapters.default.lora_" in n), n
