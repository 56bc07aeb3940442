"""Activation offloading: gradients unchanged with the hooks on (on CPU the hooks pass tensors through; the
copy to pinned memory is checked by tests/gpu/test_kernels_cuda.py)."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.kernels.offload import offload_activations


def _model():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # stands in for an adapter
    model.model.layers[1].self_attn.q_proj.weight.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model.train()


def _grads(lm, ids, **offload_kwargs):
    lm.zero_grad()
    with offload_activations(**offload_kwargs) as stats:
        loss = lm(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return [p.grad.clone() for p in lm.parameters() if p.requires_grad], stats


@pytest.mark.parametrize("enabled", [True, False])
def test_gradients_unchanged_with_offload_hooks(enabled):
    model = _model()
    ids = torch.randint(0, 64, (2, 8))
    ref, _ = _grads(model, ids, enabled=False)
    out, stats = _grads(model, ids, model=model, min_bytes=0, enabled=enabled)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stats.tensors == 0 and stats.bytes == 0  # nothing to move off a CPU
    # With checkpointing the hooks see the checkpointed layer inputs (and the tensors saved after the layers).
    assert (stats.seen > 0) == enabled


def test_bad_min_bytes():
    with pytest.raises(ValueError, match="min_bytes"), offload_activations(min_bytes=-1):
        pass
