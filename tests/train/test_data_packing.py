"""Packing and batching: packed rows give the same per-example logits and loss as unpacked batches.

Model: a tiny seeded LlamaForCausalLM from a config (hidden 32, 2 layers, fp32). Tolerance 1e-5 absolute
on logits: both paths compute the same sums in fp32, differing only in reduction order over masked keys
(the observed difference is around 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.train.data import IGNORE_INDEX, block_causal_mask, collate, pack_examples

VOCAB = 50


def examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]  # a masked "prompt", then trained tokens
        out.append({"input_ids": ids, "labels": labels})
    return out


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def test_pack_examples_greedy_layout():
    exs = examples([5, 4, 6, 3, 9])
    packs = pack_examples(exs, max_seq_length=10)
    assert [p["seq_lens"] for p in packs] == [[5, 4], [6, 3], [9]]
    for p in packs:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) == sum(p["seq_lens"]) <= 10
    assert packs[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packs[0]["input_ids"] == exs[0]["input_ids"] + exs[1]["input_ids"]
    # the first label of each example is masked: nothing is trained across a boundary
    assert packs[1]["labels"] == [IGNORE_INDEX] + exs[2]["labels"][1:] + [IGNORE_INDEX] + exs[3]["labels"][1:]
    with pytest.raises(ValueError, match="max_seq_length=8"):
        pack_examples(exs, max_seq_length=8)


def test_block_causal_mask_layout():
    mask = block_causal_mask([[2, 1]], total_len=4, dtype=torch.float32)  # one row: [a a b pad]
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min
    assert block_causal_mask([[1]], 1, torch.bfloat16).dtype == torch.bfloat16


def test_collate_pads_and_masks():
    exs = examples([3, 5])
    batch = collate(exs, pad_token_id=0, packing=False)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 5)
    assert batch["input_ids"][0, 3:].tolist() == [0, 0]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    packed = collate(pack_examples(exs, 10), pad_token_id=0, packing=True, mask_dtype=torch.float16)
    assert packed["attention_mask"].shape == (1, 1, 8, 8) and packed["attention_mask"].dtype == torch.float16
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="seq_lens"):
        collate(exs, pad_token_id=0, packing=True)


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[t] against labels[t + 1], 0 where masked. (B, T-1)"""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(attn):
    model = tiny_llama(attn)
    exs = examples([7, 5, 9, 4, 6], seed=1)
    packs = pack_examples(exs, max_seq_length=16)
    assert len(packs) < len(exs)  # some rows really hold several examples

    with torch.no_grad():
        plain = collate(exs, pad_token_id=0, packing=False)
        plain_logits = model(**{k: v for k, v in plain.items() if k != "labels"}).logits  # (5, 9, V)
        packed = collate(packs, pad_token_id=0, packing=True)
        packed_out = model(**packed)
    # per example: logits of the example alone == its slice of the packed row
    i = 0
    for b, p in enumerate(packs):
        start = 0
        for n in p["seq_lens"]:
            torch.testing.assert_close(
                packed_out.logits[b, start : start + n], plain_logits[i, :n], atol=1e-5, rtol=0
            )
            start += n
            i += 1
    # the same tokens take loss, with the same values, so the token-mean loss agrees
    plain_loss = per_token_loss(plain_logits, plain["labels"])
    packed_loss = per_token_loss(packed_out.logits, packed["labels"])
    n_plain = (plain["labels"][:, 1:] != IGNORE_INDEX).sum()
    n_packed = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert n_plain == n_packed
    torch.testing.assert_close(packed_loss.sum() / n_packed, plain_loss.sum() / n_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_out.loss, plain_loss.sum() / n_plain, atol=1e-5, rtol=0)


def test_restarted_positions_alone_leak_across_examples():
    """Why the 4D mask exists: with a plain 2D mask the second packed example sees the first one."""
    model = tiny_llama("sdpa")
    exs = examples([6, 6], seed=2)
    packed = collate(pack_examples(exs, 12), pad_token_id=0, packing=True)
    with torch.no_grad():
        leaky = model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            attention_mask=torch.ones_like(packed["input_ids"]),
        ).logits
        alone = model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits
    assert (leaky[0, 6:] - alone[0]).abs().max() > 1e-3
