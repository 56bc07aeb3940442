"""``lorakit.FastLanguageModel``: Unsloth's API (seed 003's workflow) on lorakit's NF4 and TRL's SFTTrainer."""

from __future__ import annotations

import pytest
import torch

from lorakit import FastLanguageModel
from lorakit.quant import Linear4bit

from ._helpers import TINY_TIED, lib, trainable_count

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_seed_003_script_runs_with_only_its_imports_changed(tmp_path, monkeypatch) -> None:
    """Seed 003 (Unsloth's Llama-3.2 notebook as a script): load in 4 bit, add LoRA, SFT on a "text" column,
    generate, save. Changed: the two imports (``from unsloth import`` / ``from trl import SFTTrainer``), the model
    path (a local tiny model), the step count and ``bf16=False`` / ``optim`` (CPU; Unsloth runs on GPUs only)."""
    monkeypatch.chdir(tmp_path)
    # ---- the script ------------------------------------------------------------------------------------------
    from datasets import Dataset
    from trl import SFTConfig

    from lorakit import FastLanguageModel
    from lorakit.integrations.trl import SFTTrainer

    max_seq_length = 2048
    dtype = None
    load_in_4bit = True
    with pytest.warns(UserWarning, match="max_position_embeddings"):  # the tiny model has 256 positions
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(TINY_TIED), max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
        )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    dataset = Dataset.from_dict({"text": [f"<|user|>name a color<|end|><|assistant|>{c}<|end|>"
                                          for c in ["red", "green", "blue", "white"] * 2]})
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        args=SFTConfig(
            dataset_text_field="text",
            max_length=max_seq_length,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            warmup_steps=1,
            max_steps=1,
            learning_rate=2e-4,
            logging_steps=1,
            optim="adamw_torch",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir="outputs",
            report_to="none",
            bf16=False,
            use_cpu=True,
            disable_tqdm=True,
        ),
    )
    trainer_stats = trainer.train()
    FastLanguageModel.for_inference(model)
    messages = [{"role": "user", "content": "name a color"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    outputs = model.generate(**inputs, max_new_tokens=4, use_cache=True, do_sample=False)
    model.save_pretrained("lora_model")
    tokenizer.save_pretrained("lora_model")
    # ---- checks ----------------------------------------------------------------------------------------------
    assert trainer_stats.global_step == 1 and outputs.shape[1] > inputs["input_ids"].shape[1]
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora_model" / "model.safetensors").exists()
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert linears and all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    assert all(m.weight.quant_state.nested is not None for m in linears)  # double quantization


def test_get_peft_model_counts_match_peft(tmp_path) -> None:
    peft = lib("peft")
    model, _ = FastLanguageModel.from_pretrained(str(TINY_TIED), max_seq_length=128, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing=True)
    from transformers import AutoModelForCausalLM

    oracle = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(TINY_TIED),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert trainable_count(model) == trainable_count(oracle)
    assert model.get_base_model().is_activation_checkpointing
    assert model.max_seq_length == 128
    FastLanguageModel.for_inference(model)
    assert not model.training
    FastLanguageModel.for_training(model)
    assert model.training


def test_random_state_seeds_the_adapters() -> None:
    def adapters(seed: int) -> dict[str, torch.Tensor]:
        model, _ = FastLanguageModel.from_pretrained(str(TINY_TIED), max_seq_length=64, load_in_4bit=False)
        model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], random_state=seed,
                                                 use_gradient_checkpointing=False)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b, c = adapters(1), adapters(1), adapters(2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: FastLanguageModel.from_pretrained(str(TINY_TIED), fast_inference=True), "fast_inference"),
        (lambda: FastLanguageModel.from_pretrained(str(TINY_TIED), full_finetuning=True), "full_finetuning"),
        (lambda: FastLanguageModel.from_pretrained(str(TINY_TIED), rope_scaling={"type": "linear"}), "rope_scaling"),
        (lambda: FastLanguageModel.from_pretrained(str(TINY_TIED), gpu_memory_utilization=0.5),
         "gpu_memory_utilization"),
    ],
)
def test_unsupported_unsloth_options_raise_naming_themselves(call, name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        call()


def test_unsupported_get_peft_model_option_raises_naming_itself() -> None:
    model, _ = FastLanguageModel.from_pretrained(str(TINY_TIED), load_in_4bit=False, max_seq_length=64)
    with pytest.raises(NotImplementedError, match="qat_scheme"):
        FastLanguageModel.get_peft_model(model, qat_scheme="fp8-int4")
