"""Per-process memory and step time of DDP vs FSDP2 (`training.distributed`), 2 processes on CPU (gloo).

The same seeded Llama (fp32, saved once to a temporary folder) with LoRA r=16 on all linear layers trains a few
AdamW steps on random tokens in each mode, under torchrun:

- ddp:  every process loads the whole model (`lorakit.train.evaluate.load_base_model`), DDP-wrapped;
- fsdp: lorakit's sharded path (`lorakit.train.distributed`): meta init, each process reads its rows, each
  decoder layer one `fully_shard` group.

Per process we report the bytes of the tensors it holds for model + optimizer (parameters, gradients and AdamW
moments, local shards only under FSDP), its peak RSS growth over the RSS before the load (after a warm-up load
of a tiny model, so imports are not counted) during the load and during the steps, and the median step time
(forward, backward, optimizer step) after one warm-up step. Both modes run in one invocation, one after the other.
glibc keeps freed heap blocks resident after large frees (its mmap threshold rises), which inflates FSDP's RSS
(a layer is all-gathered and freed per forward / backward); MALLOC_MMAP_THRESHOLD_=65536 fixes the threshold.

    python bench/bench_fsdp.py [--hidden 768] [--layers 6] [--steps 5] [--quant nf4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _tensor_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Local bytes of parameters, gradients and optimizer state held by this process."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * local(p.grad).element_size()
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += local(v).numel() * local(v).element_size()
    return total


def _build(mode: str, model_dir: Path, quant: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module to call, PeftModel) in `mode`."""
    from lorakit import LoraConfig, get_peft_model
    from lorakit.train.config import QuantizationConfig

    qcfg = QuantizationConfig(method=quant, bnb_4bit_quant_storage="bfloat16" if quant != "none" else "uint8")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if mode == "ddp":
        from lorakit.train.evaluate import load_base_model

        base, _ = load_base_model(str(model_dir), "float32", qcfg)
        model = get_peft_model(base, lora)
        return torch.nn.parallel.DistributedDataParallel(model), model
    from lorakit.train.distributed import ShardedModel, adapter_init_values, empty_base_model, mixed_precision_policy

    base, _, path, dtype = empty_base_model(str(model_dir), "float32", qcfg, None, None, False)
    model = get_peft_model(base, lora)
    values = adapter_init_values(model, True)
    ShardedModel(model, model, mixed_precision_policy(False)).load(path, dtype, values, torch.device("cpu"))
    return model, model


def worker(mode: str, warmup_dir: Path, model_dir: Path, steps: int, quant: str, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _build(mode, warmup_dir, quant)  # imports, lazy init
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
    module, model = _build(mode, model_dir, quant)
    load_peak = _rss("VmHWM") - before
    Path("/proc/self/clear_refs").write_text("5")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(rank))  # (B, T) per rank
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        module(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        tensors = _tensor_bytes(model, optimizer)  # grads still there: the step's high-water mark
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    result = {"tensor_bytes": tensors, "load_peak": load_peak, "train_peak": _rss("VmHWM") - before,
              "step_s": statistics.median(times[1:])}
    out.with_suffix(f".{mode}.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "WARMUP", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, warmup, model, out = args.worker
        worker(mode, Path(warmup), Path(model), args.steps, args.quant, Path(out))
        return

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    sizes = {}
    for name, hidden, layers, vocab in [("warmup", 32, 2, 512), ("model", args.hidden, args.layers, args.vocab)]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                             num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                             num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        sizes[name] = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        del model
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    results = {}
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--steps", str(args.steps), "--quant", args.quant, "--worker", mode, str(tmp / "warmup"),
               str(tmp / "model"), str(tmp / "out")]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        results[mode] = [json.loads((tmp / f"out.{mode}.{r}.json").read_text()) for r in range(2)]
    print(f"torch {torch.__version__}, model fp32 {sizes['model'] / 2**20:.1f} MiB "
          f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), quantization {args.quant}, "
          f"LoRA r=16 all-linear, batch 2x128 tokens per process, 2 processes (gloo, 1 thread each)")
    print("| mode | model+optimizer tensors (MiB) | peak RSS growth, load (MiB) | peak RSS growth, steps "
          "(MiB) | step (s) |")
    print("|---|---|---|---|---|")
    for mode, rows in results.items():
        cells = [" / ".join(f"{r[k] / 2**20:.1f}" for r in rows) for k in ("tensor_bytes", "load_peak", "train_peak")]
        print(f"| {mode} | {' | '.join(cells)} | {max(r['step_s'] for r in rows):.3f} |")
    ddp, fsdp = results["ddp"], results["fsdp"]
    ratios = {k: max(r[k] for r in fsdp) / max(r[k] for r in ddp)
              for k in ("tensor_bytes", "load_peak", "train_peak", "step_s")}
    print("FSDP / DDP (worst process of each): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
