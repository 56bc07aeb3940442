"""Opt-in (``pytest -m gpu``, 1 or more CUDA GPUs): transformers' `Trainer` with accelerate's FSDP2 config trains a
lorakit model to the same adapter as one GPU without FSDP with the same global batch, and saves it in PEFT's layout.
Two processes with 2+ GPUs; with one GPU, one FSDP process (accelerate still launches it through torchrun and wraps
the model with `fully_shard`: the code path without the sharding).

accelerate turns FSDP on for accelerator devices only (accelerate 1.16 `state.py` leaves MULTI_CPU out of the
FSDP switch), so the CPU test of the same Trainer path, tests/integration/test_trainer_fsdp.py, sets accelerate's
distributed type itself; this test runs it as users do, under `accelerate launch` on GPUs (NCCL). Status: written
against transformers 5.25 / accelerate 1.16 and not yet run -- no GPU machine was lent to the sessions that wrote
it.

Tolerance 1e-5 / 1e-4 (fp32, TF32 off): the sharded run sums the same gradients in another order (reduce-scatter).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (accelerate runs FSDP on GPUs only)"),
]
HERE = Path(__file__).resolve().parent
FSDP2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parents[1], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_trainer_with_accelerate_fsdp2_matches_one_gpu(tmp_path):
    peft = pytest.importorskip("peft")
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "model")
    worker = str(HERE.parent / "integration" / "trainer_worker.py")
    _run([sys.executable, worker, str(model_dir), str(tmp_path / "one"), "4"])
    (tmp_path / "fsdp2.yaml").write_text(FSDP2_CONFIG)
    processes = min(2, torch.cuda.device_count())
    _run(["accelerate", "launch", "--config_file", str(tmp_path / "fsdp2.yaml"), "--num_processes", str(processes),
          worker, str(model_dir), str(tmp_path / "two"), str(4 // processes)])

    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and all("lora_" in k for k in two)  # adapter only, PEFT's names
    start = load_file(tmp_path / "one" / "adapter-start" / "adapter_model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # training moved the adapter
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                           str(tmp_path / "two" / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
