"""What the FSDP tests run under torchrun (2 processes, gloo), in one launch (each launch costs seconds):

    python -m tests.train.fsdp_worker OUT WARMUP_MODEL MODEL

1. the README's recipe: fully_shard on a get_peft_model model (16-bit, then 4-bit) in a plain PyTorch loop; writes
   to ``OUT.recipe.json`` the largest differences to one unsharded process on the same global batch;
2. lorakit's sharded load of MODEL (after one of WARMUP_MODEL, so imports and lazy initialisation are not counted);
   writes each process's peak RSS growth to ``OUT.<rank>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def recipe(quantized: bool) -> float:
    """The README recipe on a tiny Llama (4-bit NF4 base with `quantized`); returns the largest difference of
    the trained adapter to one unsharded process on the whole batch."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, quantize_model
    from tests.conftest import make_tiny_llama

    rank, world = dist.get_rank(), dist.get_world_size()
    base = make_tiny_llama(seed=0).train()
    if quantized:
        quantize_model(base, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_quant_storage=torch.bfloat16))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    reference = copy.deepcopy(model)  # one process, whole batch
    # --- the recipe (README "Sharded training") ---
    for module in model.modules():
        if hasattr(module, "expose_quant_state"):  # a 4-bit linear: its scales shard with the packed weight
            module.expose_quant_state()
    for layer in model.base_model.model.model.layers:  # each decoder layer is one sharded group
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, final norm, LM head
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # ---
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 97, (2 * world, 9), generator=torch.Generator().manual_seed(1))  # global batch
    mine = ids[rank * 2 : (rank + 1) * 2]
    for _ in range(2):
        model(input_ids=mine, labels=mine).loss.backward()  # reduce-scatter averages over the processes
        optimizer.step()
        optimizer.zero_grad()
        reference(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    ref = dict(reference.named_parameters())
    return max((p.full_tensor() - ref[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad)


def _sharded_load(model_dir: Path) -> torch.nn.Module:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.distributed import ShardedModel, adapter_init_values, empty_base_model, mixed_precision_policy

    base, _, path, dtype = empty_base_model(str(model_dir), "float32", QuantizationConfig(), None, None, False)
    config = LoraConfig(r=4, target_modules="all-linear")
    model = get_peft_model(base, config)
    adapters = adapter_init_values(model, config)
    ShardedModel(model, model, mixed_precision_policy(False)).load(path, dtype, adapters, torch.device("cpu"))
    return model


def load(warmup_dir: Path, model_dir: Path, out: Path) -> None:
    """Load `warmup_dir` first (imports and lazy initialisation are not the load's memory), then measure."""
    import torch.distributed as dist

    _sharded_load(warmup_dir)
    before = _rss("VmRSS")
    _peak_rss_reset()
    model = _sharded_load(model_dir)
    peak = _rss("VmHWM") - before
    assert not any(p.is_meta for p in model.parameters())
    out.with_suffix(f".{dist.get_rank()}.json").write_text(json.dumps({"peak_rss_growth": peak}))


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out, warmup, model = map(Path, sys.argv[1:4])
    diffs = {"max_diff": recipe(False), "max_diff_4bit": recipe(True)}
    if dist.get_rank() == 0:
        out.with_suffix(".recipe.json").write_text(json.dumps(diffs))
    load(warmup, model, out)
    dist.destroy_process_group()
