"""AutoPeftModel*: the base model named by the adapter's config, then the adapter; parity with PEFT's classes on
the same folders, and the errors for a missing base, a wrong class or task type."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, get_peft_model

from .conftest import REPO


def _save_base(folder, vocab: int = 128) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _save_adapter(tmp_path, task_type: str | None = "CAUSAL_LM", vocab: int = 128) -> str:
    """A train-free adapter (B != 0) over a base saved in ``tmp_path/base``; its config names that folder."""
    base = LlamaForCausalLM.from_pretrained(_save_base(tmp_path / "base", vocab))
    config = LoraConfig(task_type=task_type, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_causal_lm_matches_peft(tmp_path, ids) -> None:
    adapter = _save_adapter(tmp_path)
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert isinstance(ours, lorakit.PeftModelForCausalLM) and not ours.training
    assert ours.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    # fp32 on both sides, same weights and op order: 1e-6 leaves room for kernel differences only
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-6, rtol=0)
    with torch.no_grad():
        base = _logits(LlamaForCausalLM.from_pretrained(tmp_path / "base"), ids)
    assert not torch.allclose(_logits(ours, ids), base)  # the adapter was applied


def test_kwargs_go_to_the_base_loader_and_adapter_options_to_the_adapter(tmp_path) -> None:
    adapter = _save_adapter(tmp_path)
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True, dtype=torch.bfloat16)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True, dtype=torch.bfloat16)
    q_ours = ours.get_base_model().model.layers[0].self_attn.q_proj
    q_theirs = theirs.get_base_model().model.layers[0].self_attn.q_proj
    assert q_ours.base_layer.weight.dtype == q_theirs.base_layer.weight.dtype == torch.bfloat16
    assert q_ours.adapters["default"].lora_A.weight.dtype == q_theirs.lora_A["default"].weight.dtype == torch.float32
    assert q_ours.adapters["default"].lora_A.weight.requires_grad
    # PEFT passes every keyword to the base loader too, where autocast_adapter_dtype fails (LlamaForCausalLM's
    # __init__ takes no such argument); lorakit keeps PeftModel.from_pretrained's own options for the adapter
    with pytest.raises(TypeError, match="autocast_adapter_dtype"):
        peft.AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    q_ours = ours.get_base_model().model.layers[0].self_attn.q_proj
    assert q_ours.adapters["default"].lora_A.weight.dtype == torch.bfloat16


def test_auto_peft_model_without_task_type_uses_auto_mapping_as_peft(tmp_path, ids) -> None:
    adapter = _save_adapter(tmp_path, task_type=None)
    mapping = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping["base_model_class"] == "LlamaForCausalLM"
    ours = lorakit.AutoPeftModel.from_pretrained(adapter)
    theirs = peft.AutoPeftModel.from_pretrained(adapter)
    assert type(ours) is lorakit.PeftModel and type(ours.get_base_model()) is LlamaForCausalLM
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not in the import allowlist"):
        lorakit.AutoPeftModel.from_pretrained(adapter, import_allowlist=["diffusers"])


@pytest.mark.parametrize(
    "ours, theirs, task_type, match",
    [
        ("AutoPeftModel", "AutoPeftModel", "CAUSAL_LM", "Cannot use `AutoPeftModel` with a task type"),
        ("AutoPeftModelForSequenceClassification", "AutoPeftModelForSequenceClassification", "CAUSAL_LM",
         "Expected target PEFT class: PeftModelForCausalLM"),
    ],
)
def test_wrong_class_for_the_task_type_fails_as_in_peft(tmp_path, ours, theirs, task_type, match) -> None:
    adapter = _save_adapter(tmp_path, task_type=task_type)
    for klass in (getattr(lorakit, ours), getattr(peft, theirs)):
        with pytest.raises(ValueError, match=match):
            klass.from_pretrained(adapter)


def test_missing_or_unloadable_base_names_the_path_and_the_fix(tmp_path) -> None:
    """The error keeps the class of transformers' (what PEFT raises), so code catching it goes on working."""
    adapter = _save_adapter(tmp_path)
    base = tmp_path / "base"
    (base / "config.json").unlink()
    with pytest.raises(ValueError, match="Unrecognized model"):
        peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    with pytest.raises(ValueError, match="could not be loaded with AutoModelForCausalLM") as info:
        lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    message = str(info.value)
    assert repr(str(base)) in message and "base_model_name_or_path" in message and "Unrecognized model" in message
    assert f"PeftModel.from_pretrained(base_model, {adapter!r})" in message
    shutil.rmtree(base)
    with pytest.raises(OSError):
        peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    with pytest.raises(OSError, match=f"the base model {str(base)!r} .*there is no such folder"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter)


def test_no_base_model_name_in_config(tmp_path) -> None:
    adapter = _save_adapter(tmp_path)
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter)


def test_a_larger_saved_tokenizer_resizes_the_embeddings_as_peft(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    adapter = _save_adapter(tmp_path, vocab=len(tokenizer) - 4)
    tokenizer.save_pretrained(adapter)
    ours = lorakit.AutoPeftModelForCausalLM.from_pretrained(adapter)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    shape = ours.get_base_model().get_input_embeddings().weight.shape
    assert shape == theirs.get_base_model().get_input_embeddings().weight.shape == (len(tokenizer), 64)


def test_auto_classes_are_not_instantiated_directly() -> None:
    with pytest.raises(OSError, match="from_pretrained"):
        lorakit.AutoPeftModelForCausalLM()
    for name in ("AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
                 "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
                 "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"):
        ours, theirs = getattr(lorakit, name), getattr(peft, name)
        assert ours._target_peft_class.__name__ == theirs._target_peft_class.__name__
        assert ours._target_class == getattr(theirs._target_class, "__name__", None)
