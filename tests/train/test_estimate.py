"""``estimate_memory``'s activation term against the tensors autograd actually saves (saved-tensor hooks)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from lorakit import LoraConfig, get_peft_model
from lorakit.train.estimate import estimate_memory, meta_model


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in the decoder's forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("head_dim", [8, 32])  # 8 heads x 8 = hidden; x 32 = 4 x hidden (as Qwen3-0.6B's 2x)
def test_activation_estimate_follows_head_dim(tmp_path, head_dim):
    cfg = tf.Qwen3Config(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=head_dim, attn_implementation="sdpa")
    cfg.save_pretrained(tmp_path)
    batch, seq = 4, 32
    estimate = estimate_memory(meta_model(str(tmp_path)), "lora", seq, batch, r=8, dtype="float32")
    torch.manual_seed(0)
    model = get_peft_model(tf.Qwen3ForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear")).train()
    measured = _saved_bytes(model, torch.randint(0, 50, (batch, seq)))
    assert abs(estimate.activations / measured - 1) < 0.1, (estimate.activations, measured)
