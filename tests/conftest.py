"""Shared test settings: small thread count and fixed seeds so CPU runs are quick and repeatable."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_tiny_llama(layers: int = 2, vocab: int = 97, seed: int = 0, hidden: int = 32):
    """A tiny LlamaForCausalLM built from a config (no download); fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(1))
