"""Atomic saves: a killed or failing save never leaves an adapter folder that loads as if complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.io.files import atomic_directory

from ..conftest import make_tiny_llama

SAVER = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lorakit import LoraConfig, get_peft_model
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=64, target_modules="all-linear"))
    params = [p for n, p in model.named_parameters() if ".adapters." in n]
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        with torch.no_grad():
            for p in params:
                p.fill_(float(i))
        model.save_pretrained(sys.argv[1])
    """
)


def _tiny_llama_256():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97)
    return LlamaForCausalLM(cfg)


def test_killed_save_never_leaves_a_mixed_adapter(tmp_path) -> None:
    """Kill -9 a process that saves in a loop, twice at different moments; each time the folder either
    has no config (does not load) or loads with every tensor from one and the same save."""
    folder = tmp_path / "adapter"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    outcomes = []
    for delay in (0.4, 0.9):
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (folder / "adapter_config.json").exists():
            with pytest.raises(FileNotFoundError):
                PeftModel.from_pretrained(_tiny_llama_256(), folder)
            outcomes.append("incomplete")
            continue
        model = PeftModel.from_pretrained(_tiny_llama_256(), folder)
        values = {p.flatten()[0].item() for n, p in model.named_parameters() if ".adapters." in n}
        assert len(values) == 1, f"tensors from different saves: {sorted(values)[:5]}"
        outcomes.append("complete")
    print("outcomes:", outcomes)


def test_failing_save_keeps_the_previous_adapter(tmp_path, monkeypatch, input_ids) -> None:
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(1.0)

    import lorakit.model as lm

    def broken(state, folder, safe_serialization=True):
        raise OSError("disk full")

    monkeypatch.setattr(lm, "save_adapter_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected)
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(f".tmp-{tmp_path.name}")]


def test_atomic_directory_new_folder_appears_whole(tmp_path) -> None:
    target = tmp_path / "new"
    with atomic_directory(target) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).write("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_resave_in_other_format_leaves_no_stale_weights(tmp_path, first, second) -> None:
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path, safe_serialization=first)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    model.save_pretrained(tmp_path, safe_serialization=second)
    weights = {"adapter_model.safetensors", "adapter_model.bin"} & set(os.listdir(tmp_path))
    assert weights == {"adapter_model.safetensors" if second else "adapter_model.bin"}
    ids = torch.tensor([[1, 2, 3, 4]])
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
