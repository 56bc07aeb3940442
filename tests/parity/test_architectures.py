"""Parity with PEFT (the oracle) on tiny models of ten architectures.

For each architecture and target set: identical trainable/all parameter counts; PEFT's saved folder loads in
lorakit to the same logits; lorakit's saved folder loads in PEFT to the same logits. LoRA weights are random
(``init_lora_weights=False``) so adapted and base outputs differ (checked), and classifier copies are perturbed.
Tolerance 1e-5 (fp32): both sides run the same float ops in the same order up to summation order.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf

import lorakit

TOL = 1e-5

SMALL = dict(vocab_size=97)
DEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **SMALL)


def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **DEC)), None


def _mistral():
    return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **DEC)), None


def _qwen2():
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **DEC)), None


def _gemma():
    return tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **DEC)), None


def _phi3():
    return tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=4, pad_token_id=0, **DEC)), None


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL)), None


def _neox():
    cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **SMALL)
    return tf.GPTNeoXForCausalLM(cfg), None


def _falcon():
    cfg = tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **SMALL)
    return tf.FalconForCausalLM(cfg), None


def _bert():
    cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **SMALL)
    return tf.BertForSequenceClassification(cfg), "SEQ_CLS"


def _roberta():
    cfg = tf.RobertaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, pad_token_id=1, **SMALL
    )
    return tf.RobertaForSequenceClassification(cfg), "SEQ_CLS"


LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama": (_llama, LLAMA_LIKE),
    "mistral": (_mistral, LLAMA_LIKE),
    "qwen2": (_qwen2, LLAMA_LIKE),
    "gemma": (_gemma, LLAMA_LIKE),
    "phi3": (_phi3, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "gpt_neox": (_neox, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "falcon": (_falcon, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    "bert": (_bert, ["query", "key", "value", "dense"]),
    "roberta": (_roberta, ["query", "key", "value", "dense"]),
}


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, 97, (2, 9), generator=g)}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_inputs()).logits


def _perturb_saved_modules(model: torch.nn.Module) -> None:
    """Make PEFT's trainable classifier copies differ from the originals, so the round trip is not vacuous."""
    for name, param in model.named_parameters():
        if ".modules_to_save." in name:
            with torch.no_grad():
                param.add_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("targets", ["named", "all-linear"])
def test_parity_with_peft(arch: str, targets: str, tmp_path) -> None:
    build, names = CASES[arch]
    torch.manual_seed(0)
    base, task = build()
    target_modules = names if targets == "named" else "all-linear"
    kwargs = dict(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False, task_type=task)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert type(ours).__name__ == type(theirs).__name__

    # PEFT's folder -> lorakit
    _perturb_saved_modules(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    expected = _logits(theirs)
    assert (expected - _logits(base)).abs().max() > 1e-3, "adapter must change the output"
    torch.testing.assert_close(_logits(loaded), expected, atol=TOL, rtol=0)

    # lorakit's folder -> PEFT
    loaded.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_logits(back), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_matched_modules_equal_peft(arch: str) -> None:
    """The set of adapted module names equals PEFT's for list, regex and all-linear targets."""
    build, names = CASES[arch]
    torch.manual_seed(0)
    base, task = build()
    for target in (names[:2], rf".*\.({'|'.join(names[:2])})", "all-linear"):
        kwargs = dict(r=2, target_modules=target, task_type=task)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
        peft_names = {
            n for n, m in theirs.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
        }
        our_names = {n for n, m in ours.named_modules() if isinstance(m, lorakit.layers.LoraLinear)}
        assert our_names == peft_names, target
