"""Tiny models and datasets shared by the trainer / TRL integration tests (CPU, seeded, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from datasets import Dataset
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
TINY_TIED = REPO / "examples" / "tiny_model"  # tied embeddings, like Llama-3.2-1B/3B

#: the library under test and its oracle
LIBS = ["lorakit", "peft"]


def lib(name: str):
    """``lorakit`` or ``peft`` (skipping the test when PEFT is not installed)."""
    import pytest

    return pytest.importorskip(name)


def tiny_base(tied: bool, seed: int = 0):
    """The shipped tiny model (tied) or an untied tiny Llama built from a config with its tokenizer's vocab."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if tied:
        return AutoModelForCausalLM.from_pretrained(TINY_TIED)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=444, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def token_dataset(rows: int = 16, length: int = 12, seed: int = 0) -> Dataset:
    ids = torch.randint(2, 400, (rows, length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def adapter_keys(folder: str | os.PathLike) -> list[str]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def adapter_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_process(cmd: list[str], timeout: int = 300, **env: str) -> None:
    """Run `cmd` from the repository root (one thread per process, the repo on the path); fail the test with the
    end of its output if it exits non-zero."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
