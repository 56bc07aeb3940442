"""prepare_model_for_kbit_training against PEFT's (oracle): same freezing and checkpointing, fewer fp32 casts."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.quant.config import BitsAndBytesConfig
from lorakit.quant.load import quantize_model
from lorakit.quant.prepare import prepare_model_for_kbit_training

peft = pytest.importorskip("peft")


def _tiny_4bit() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))


@pytest.mark.parametrize("gc_kwargs", [None, {"use_reentrant": False}])
def test_prepare_matches_peft_except_casts(gc_kwargs):
    ours = prepare_model_for_kbit_training(_tiny_4bit(), gradient_checkpointing_kwargs=gc_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.prepare_model_for_kbit_training(_tiny_4bit(), gradient_checkpointing_kwargs=gc_kwargs)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing is True
    hooks = lambda m: len(m.get_input_embeddings()._forward_hooks)  # noqa: E731
    assert hooks(ours) == hooks(theirs)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        if p.dim() == 1:  # norms: fp32 in both
            assert p.dtype == q.dtype == torch.float32, name
        elif "embed_tokens" in name or "lm_head" in name:  # PEFT casts these, we keep bf16
            assert p.dtype == torch.bfloat16 and q.dtype == torch.float32, name
        else:  # packed 4-bit weights: never cast
            assert p.dtype == q.dtype == torch.uint8, name


def test_prepared_model_backpropagates_to_inputs():
    model = prepare_model_for_kbit_training(_tiny_4bit())
    model.train()
    out = model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8)))
    out.loss.backward()  # reentrant checkpointing works: the embedding output requires grad
    assert all(p.grad is None for p in model.parameters())
