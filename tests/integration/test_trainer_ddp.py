"""transformers' `Trainer` (lorakit's subclass) with a lorakit model under 2 processes (torchrun, DDP over gloo, CPU)
trains the same adapter as one process with the same global batch, and rank 0 saves it in PEFT's layout.

`ACCELERATE_USE_CPU=true` is what makes transformers' Trainer join the process group on a machine without a GPU:
without it each torchrun process trained alone on the whole dataset (checked: epoch 0.125 per step instead of
0.25). Tolerance 1e-6 (fp32): the two runs differ by the order of one all-reduce (measured 1.9e-7).
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration._helpers import run_process as _run

WORKER = str(Path(__file__).resolve().parent / "trainer_worker.py")


def test_trainer_under_ddp_matches_one_process(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    _run([sys.executable, WORKER, str(tiny_model_dir), str(tmp_path / "one"), "4"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
          str(tiny_model_dir), str(tmp_path / "two"), "2"], ACCELERATE_USE_CPU="true")

    start = load_file(tmp_path / "one" / "adapter-start" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() == start.keys() and all("lora_" in k for k in two)  # adapter only
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # training moved it
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(tmp_path / "two" / "adapter"))
    loaded = model.state_dict()  # PEFT holds exactly the saved tensors (its names add the adapter name)
    for key, value in two.items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value, atol=0, rtol=0)
