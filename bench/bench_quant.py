"""Quantization benchmarks, side by side in one run (CPU).

1. dequant: lorakit's pure-PyTorch NF4 dequantization (default: worker threads for a large tensor; and the
   calling thread alone, as before them) vs bitsandbytes' CPU C++ kernel (same weight), and Linear4bit
   forward + backward of both; interleaved repetitions, medians, load averages (the machine may be shared).
2. load: peak RSS of ``lorakit.load_model(..., load_in_4bit)`` on a locally generated Llama-shaped
   checkpoint (random weights, sharded safetensors), in a fresh process, against the target
   ``1.3 x quantized size + largest tensor``; bits per parameter of the quantized linear weights.
3. prepare: bytes cast to fp32 by lorakit's prepare_model_for_kbit_training vs PEFT's on that model.

    python bench/bench_quant.py --rows 4096 --cols 14336 --hidden 1024 --layers 4 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each ``fns`` entry, the entries taking turns (so load from other jobs hits all);
    ``cpu`` (if given) gets the process CPU seconds per call (all threads: CPU / wall ~2 means two cores)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


def bench_dequant(rows: int, cols: int, repeats: int, tokens: int) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from lorakit.quant import Linear4bit, nf4_cpu
    from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    A = torch.randn(rows, cols, dtype=torch.bfloat16)
    packed, state = quantize_4bit(A, compress_statistics=True)
    bnb_packed, bnb_state = bnbF.quantize_4bit(A, quant_type="nf4", compress_statistics=True)

    def one_thread() -> torch.Tensor:
        """The calling thread only, in steps of _STEP (the path before worker threads, 2026-11-24)."""
        saved = nf4_cpu._PARALLEL_MIN, nf4_cpu._WORKER_STEP
        nf4_cpu._PARALLEL_MIN, nf4_cpu._WORKER_STEP = 2**62, nf4_cpu._STEP
        try:
            return dequantize_4bit(packed, state)
        finally:
            nf4_cpu._PARALLEL_MIN, nf4_cpu._WORKER_STEP = saved

    print(f"load before: {_load()}")
    cpu: dict[str, list[float]] = {}
    times = _interleaved(
        {
            "lorakit": lambda: dequantize_4bit(packed, state),
            "one_thread": one_thread,
            "bnb": lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state),
        },
        repeats,
        cpu,
    )
    n = A.numel()
    print(f"load after:  {_load()}")
    print(f"dequant NF4 -> bf16, {rows}x{cols}, double quant, interleaved, {repeats} reps, "
          f"{torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cores: median (min)")  # fmt: skip
    labels = (
        ("lorakit (PyTorch)         ", "lorakit"),
        ("lorakit, calling thread   ", "one_thread"),
        ("bitsandbytes (C++ CPU)    ", "bnb"),
    )
    for label, name in labels:
        med, low = statistics.median(times[name]), min(times[name])
        rate, per_wall = n / med / 1e6, sum(cpu[name]) / sum(times[name])
        print(f"  {label} {med * 1e3:8.1f} ms ({low * 1e3:6.1f})  {rate:8.0f} Melem/s  CPU/wall {per_wall:.2f}")
    for name, other in (("lorakit", "bnb"), ("one_thread", "bnb"), ("lorakit", "one_thread")):
        ratios = [a / b for a, b in zip(times[name], times[other], strict=True)]
        print(f"  ratio {name} / {other} time: median of per-rep ratios {statistics.median(ratios):.2f}x")

    # Linear4bit forward + backward (grad to the input), bf16 compute; both re-dequantize in backward.
    linear = torch.nn.Linear(cols, rows, bias=False, dtype=torch.bfloat16)
    linear.weight.data = A
    ours = Linear4bit.from_linear(linear, torch.bfloat16, "nf4", compress_statistics=True)
    theirs = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(A.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    theirs = theirs.to("cpu").train()  # quantizes; train mode: no CPU inference repack (nf4-format.md)
    x = torch.randn(tokens, cols, dtype=torch.bfloat16)

    def step(layer: torch.nn.Module) -> None:
        xi = x.clone().requires_grad_(True)
        layer(xi).float().sum().backward()

    times = _interleaved({"lorakit": lambda: step(ours), "bnb": lambda: step(theirs)}, repeats)
    print(f"Linear4bit forward + backward, x ({tokens}, {cols}) bf16, weight {rows}x{cols}: median (min)")
    for label, name in (("lorakit     ", "lorakit"), ("bitsandbytes", "bnb")):
        print(f"  {label} {statistics.median(times[name]) * 1e3:8.1f} ms ({min(times[name]) * 1e3:6.1f})")
    ratios = [a / b for a, b in zip(times["lorakit"], times["bnb"], strict=True)]
    print(f"  ratio lorakit / bitsandbytes time: median of per-rep ratios {statistics.median(ratios):.2f}x")


def _load() -> str:
    """The 1, 5 and 15 minute load averages (other jobs share the machine)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_checkpoint(path: Path, hidden: int, layers: int, vocab: int, intermediate: int) -> dict:
    """A Llama-shaped model with random bf16 weights, saved as sharded safetensors (no full model in RAM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False,
        max_position_embeddings=2048, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")
    sizes = [p.numel() for p in model.parameters()]
    return {"params": sum(sizes), "largest_tensor_bytes": max(sizes) * 2}


def load_worker(path: str) -> None:
    """Runs in a fresh process: load in 4-bit (nf4, double quant), report peak RSS and sizes as JSON."""
    import accelerate  # noqa: F401  (imported before the baseline RSS is taken)
    import transformers  # noqa: F401

    from lorakit.quant import Linear4bit
    from lorakit.quant.config import BitsAndBytesConfig
    from lorakit.quant.load import load_model

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    rss_lazy = _current_rss()  # the baseline before 2026-11-24: transformers' lazy imports still to come
    from transformers import AutoConfig, LlamaForCausalLM  # noqa: F401  (modeling_llama: ~150 MiB of RSS)

    AutoConfig.from_pretrained(path)  # imports the config machinery load_model uses (~50 MiB)
    rss_before, hwm_before = _current_rss(), _current_rss("VmHWM")
    peak_box = [rss_before]
    done = threading.Event()

    def sample() -> None:  # VmHWM only helps when the load sets a new lifetime high, so poll VmRSS too
        while not done.is_set():
            peak_box[0] = max(peak_box[0], _current_rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    model, _ = load_model(path, config, torch_dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(peak_box[0], _current_rss())
    if _current_rss("VmHWM") > hwm_before:  # a new lifetime high during the load: the exact peak
        peak = max(peak, _current_rss("VmHWM"))
    state = model.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    quant_bits = quant_params = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            quant_params += module.in_features * module.out_features
            quant_bits += 8 * sum(
                t.numel() * t.element_size() for k, t in state.items() if k.startswith(f"{name}.weight")
            )
    print(json.dumps({
        "rss_before_imports": rss_lazy, "rss_before_load": rss_before, "peak_rss": peak,
        "quantized_model_bytes": size, "seconds": seconds,
        "bits_per_param": quant_bits / quant_params, "quantized_params": quant_params,
    }))  # fmt: skip


def _current_rss(field: str = "VmRSS") -> int:
    """Resident set size now (VmRSS) or its lifetime high-water mark (VmHWM), in bytes (Linux /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def bench_load(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        info = make_checkpoint(Path(tmp), args.hidden, args.layers, args.vocab, args.intermediate)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", tmp], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )  # fmt: skip
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        ckpt_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    mib = 2**20
    target = 1.3 * report["quantized_model_bytes"] + info["largest_tensor_bytes"]
    growth = report["peak_rss"] - report["rss_before_load"]
    print(f"load_model 4-bit (nf4, double quant), Llama hidden={args.hidden} layers={args.layers} "
          f"vocab={args.vocab} intermediate={args.intermediate}: {info['params'] / 1e6:.0f}M params")  # fmt: skip
    print(f"  checkpoint (bf16 safetensors)     {ckpt_bytes / mib:8.0f} MiB")
    print(f"  quantized model (state dict)      {report['quantized_model_bytes'] / mib:8.0f} MiB")
    print(f"  largest tensor (bf16)             {info['largest_tensor_bytes'] / mib:8.0f} MiB")
    lazy = report["rss_before_load"] - report["rss_before_imports"]
    print(f"  RSS before load (imports done)    {report['rss_before_load'] / mib:8.0f} MiB "
          f"(of which transformers' lazy imports {lazy / mib:.0f})")  # fmt: skip
    print(f"  peak RSS during load (polls, HWM) {report['peak_rss'] / mib:8.0f} MiB "
          f"(growth {growth / mib:.0f} MiB; {(growth + lazy) / mib:.0f} MiB counting the lazy imports, "
          f"as measured before 2026-11-24)")  # fmt: skip
    print(f"  target 1.3 x quantized + largest  {target / mib:8.0f} MiB -> growth/target = {growth / target:.2f}")
    print(f"  load time {report['seconds']:.1f} s; bits/param of quantized linears: {report['bits_per_param']:.4f}")


def bench_prepare(args: argparse.Namespace) -> None:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.quant.config import BitsAndBytesConfig
    from lorakit.quant.load import quantize_model
    from lorakit.quant.prepare import prepare_model_for_kbit_training

    def build():
        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        return quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))

    def param_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    ours, theirs = build(), build()
    before = param_bytes(ours)
    prepare_model_for_kbit_training(ours)
    peft.prepare_model_for_kbit_training(theirs)
    mib = 2**20
    print(f"prepare_model_for_kbit_training, same 4-bit model: parameter bytes before {before / mib:.0f} MiB")
    print(f"  lorakit {param_bytes(ours) / mib:8.0f} MiB   PEFT {param_bytes(theirs) / mib:8.0f} MiB   "
          f"saving {(param_bytes(theirs) - param_bytes(ours)) / mib:.0f} MiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=16, help="rows of the input of the Linear4bit benchmark")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--only", choices=["dequant", "load", "prepare"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        load_worker(args.worker)
        return
    print(f"torch {torch.__version__}")
    if args.only in (None, "dequant"):
        bench_dequant(args.rows, args.cols, args.repeats, args.tokens)
    if args.only in (None, "load"):
        bench_load(args)
    if args.only in (None, "prepare"):
        bench_prepare(args)


if __name__ == "__main__":
    main()
