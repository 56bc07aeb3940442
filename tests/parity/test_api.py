"""Parity with PEFT (the oracle) on the behaviour of the public API: which parameters train, what is saved, what
state the model is left in after each call. Tiny models from transformers configs, random LoRA B
(``init_lora_weights=False``) so adapted and base outputs differ.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as tf
from safetensors import safe_open

import lorakit

BERT = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _trainable(model) -> list[str]:
    """Trainable parameter names with the adapter name's position normalised (PEFT: ``.lora_A.default.``,
    lorakit: ``.adapters.default.lora_A.``)."""
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            names.append(name.replace(".adapters.default.", ".").replace(".default.", "."))
    return sorted(names)


def _file_keys(folder) -> list[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize(
    "task, klass",
    [("TOKEN_CLS", tf.BertForTokenClassification), ("QUESTION_ANS", tf.BertForQuestionAnswering)],
)
def test_task_head_trains_and_is_saved_as_in_peft(tmp_path, task, klass) -> None:
    results = {}
    for lib in (lorakit, peft):
        torch.manual_seed(0)
        model = klass(tf.BertConfig(**BERT))
        config = lib.LoraConfig(r=4, target_modules=["query", "value"], task_type=task, init_lora_weights=False)
        pm = lib.get_peft_model(model, config)
        pm.save_pretrained(tmp_path / lib.__name__)
        results[lib.__name__] = (_trainable(pm), _file_keys(tmp_path / lib.__name__))
    head = "qa_outputs" if task == "QUESTION_ANS" else "classifier"
    assert any(head in n for n in results["lorakit"][0])
    assert any(head in k for k in results["lorakit"][1])
    assert results["lorakit"] == results["peft"]
