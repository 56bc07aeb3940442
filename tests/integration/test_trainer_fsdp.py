"""transformers' `Trainer` (lorakit's subclass) with accelerate's FSDP2 on a lorakit model, 2 CPU processes over
gloo: the same adapter as one process with the same global batch (16-bit; a 4-bit NF4 base with ``-m slow``),
adapter-only saving in PEFT's layout under ``SHARDED_STATE_DICT``, and resuming from a sharded checkpoint equal to
the uninterrupted run. TRL's SFTTrainer (lorakit's subclass) too.

accelerate 1.16 runs FSDP only where its state names accelerator devices, so the worker
(`trainer_worker.cpu_fsdp2_accelerator`) sets that one field of accelerate's state before the Trainer uses it
(``use_configured_state``); the model wrapping (accelerate's ``fsdp2_prepare_model``: ``fully_shard`` per
``LlamaDecoderLayer``, the embeddings / norm / head groups, the root), accelerate's sharded optimizer checkpoints
and the Trainer's FSDP branches are the real ones, as on GPUs (tests/gpu/test_trainer_fsdp.py runs the same worker
under ``accelerate launch``); the trainable tensors' checkpoint shards are lorakit's (`save_trainable_state`).

Tolerances (fp32): 1e-5 between 2 processes and 1 (the reduce-scatter sums in another order; measured 9.4e-8 for
16-bit, 2.2e-7 for NF4), 1e-6 between a resumed run and the uninterrupted one (same processes, same order;
measured 0).
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from tests.integration._helpers import run_process

WORKER = str(Path(__file__).resolve().parent / "trainer_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys() and all("lora_" in k for k in got)  # the adapter only, PEFT's names
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0)


@pytest.mark.parametrize("nf4", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["16bit", "nf4"])
def test_trainer_under_accelerate_fsdp2_matches_one_process(tmp_path, tiny_model_dir, nf4):
    quant = ["--nf4"] if nf4 else []
    run_process([sys.executable, WORKER, str(tiny_model_dir), str(tmp_path / "one"), "4", "--steps", "4",
                 "--save-steps", "2", *quant])
    run_process([*TORCHRUN, str(tiny_model_dir), str(tmp_path / "two"), "2", "--steps", "4", "--save-steps", "2",
                 "--cpu-fsdp2", *quant])

    assert (tmp_path / "two" / "engine.txt").read_text() == "fsdp2 world_size=2"  # sharded, not DDP
    start = _adapter(tmp_path / "one" / "adapter-start")
    one, two = _adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "two" / "adapter")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # training moved the adapter
    _assert_same(two, one, atol=1e-5)
    # a checkpoint: the adapter (gathered) beside the shards of the trainable tensors (not the frozen base) and
    # accelerate's optimizer shards
    ckpt = tmp_path / "two" / "checkpoint-2"
    saved = FileSystemReader(ckpt / "pytorch_model_fsdp_0").read_metadata().state_dict_metadata
    assert saved and all("lora_" in key for key in saved), sorted(saved)[:4]
    assert (ckpt / "optimizer_0").is_dir()
    _assert_same(_adapter(ckpt), _adapter(tmp_path / "one" / "checkpoint-2"), atol=1e-5)


def test_trainer_under_accelerate_fsdp2_resumes_and_saves_for_peft(tmp_path, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    options = ["2", "--steps", "4", "--save-steps", "2", "--cpu-fsdp2"]
    run_process([*TORCHRUN, str(tiny_model_dir), str(tmp_path / "whole"), *options])
    run_process([*TORCHRUN, str(tiny_model_dir), str(tmp_path / "resumed"), *options,
                 "--resume", str(tmp_path / "whole" / "checkpoint-2")])

    whole = _adapter(tmp_path / "whole" / "adapter")
    at_2 = _adapter(tmp_path / "whole" / "checkpoint-2")
    assert max((whole[k] - at_2[k]).abs().max().item() for k in whole) > 1e-3  # steps 3-4 moved it
    _assert_same(_adapter(tmp_path / "resumed" / "adapter"), whole, atol=1e-6)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(tmp_path / "whole" / "adapter"))
    loaded = model.state_dict()  # PEFT holds exactly the saved tensors (its names add the adapter name)
    for key, value in whole.items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value, atol=0, rtol=0)


def test_trl_sft_trainer_under_accelerate_fsdp2_matches_one_process(tmp_path, tiny_model_dir):
    """TRL's SFTTrainer (lorakit's subclass: the same saving methods) under the same FSDP2 set-up: the adapter of 2
    sharded processes equals one process's, and it is saved in PEFT's layout."""
    run_process([sys.executable, WORKER, str(tiny_model_dir), str(tmp_path / "one"), "4", "--trl-sft"])
    run_process([*TORCHRUN, str(tiny_model_dir), str(tmp_path / "two"), "2", "--trl-sft", "--cpu-fsdp2"])

    assert (tmp_path / "two" / "engine.txt").read_text() == "fsdp2 world_size=2"
    one, start = _adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "one" / "adapter-start")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3
    _assert_same(_adapter(tmp_path / "two" / "adapter"), one, atol=1e-5)
