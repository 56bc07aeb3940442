"""GPU training speed and memory: lorakit vs transformers + PEFT (+ bitsandbytes), side by side.

    python bench/gpu/run.py                 # CUDA: Llama-3.2-1B and Llama-3.1-8B shapes, 16-bit LoRA and QLoRA,
                                            # seq 2048 and 8192, plus the longest sequence at batch 1
    python bench/gpu/run.py --write-docs    # ... and put the tables into docs/benchmarks.md
    python bench/gpu/run.py --cpu-toy       # the same scripts at toy size on CPU (kept working by a test)

Every configuration runs in its own process (``bench/gpu/worker.py``) so memory peaks never mix. Models are
built from the public configs' shapes with random weights (nothing is downloaded), bf16, activation
checkpointing on, LoRA r=16 alpha=32 dropout 0 on q/k/v/o/gate/up/down (all linear layers), AdamW. Ratios
compare the two sides of one invocation.

MFU = tokens/s x model FLOPs per token / peak bf16 dense FLOP/s, with the FLOPs of ``worker.flops_per_token``
(6 N_layers + 4 N_head + 8 N_lora + 8 L T d: forward, backward to the activations, and the recompute of
checkpointing, plus causal attention). Peak: H100/H200 SXM 989 TFLOP/s, A100 312; ``--peak-tflops`` for others.
This module imports no torch: the workers report versions and the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/gpu results: begin -->", "<!-- bench/gpu results: end -->"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, NVIDIA datasheets
GIB = 1024**3


def _plan(args: argparse.Namespace) -> list[list[str]]:
    """Worker command lines: one per (model, mode, seq, impl), then one probe per (model, mode, impl)."""
    common = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    runs = []
    for model in args.models:
        for mode in args.modes:
            for seq in args.seqs:
                batch = max(1, args.tokens_per_step // seq)
                for impl in args.impls:
                    runs.append(
                        [
                            "--impl",
                            impl,
                            "--model",
                            model,
                            "--mode",
                            mode,
                            "--seq",
                            str(seq),
                            "--batch",
                            str(batch),
                            *common,
                        ]
                    )
            if args.probe_seqs:
                for impl in args.impls:
                    offload = ["--offload"] if impl == "lorakit" and args.probe_offload else []
                    runs.append(
                        [
                            "--impl",
                            impl,
                            "--model",
                            model,
                            "--mode",
                            mode,
                            "--seq",
                            str(args.probe_seqs[0]),
                            "--device",
                            args.device,
                            "--steps",
                            "0",
                            "--warmup",
                            "0",
                            *offload,
                            "--probe",
                            *map(str, args.probe_seqs),
                        ]
                    )
    return runs


def _run_worker(argv: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "worker.py"), *argv]
    print("$ " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"argv": argv, "ok": False, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"argv": argv, "ok": False, "error": f"worker exited {proc.returncode}", "log_tail": tail}


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _mfu(r: dict[str, Any], peak_tflops: float | None) -> float | None:
    if not r.get("ok") or not r.get("tokens_per_s") or not peak_tflops:
        return None
    return r["tokens_per_s"] * r["model_flops_per_token"] / (peak_tflops * 1e12)


def _peak_for(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _key(r: dict[str, Any]) -> tuple:
    return r.get("model"), r.get("mode"), r.get("seq"), r.get("impl")


def tables(report: dict[str, Any]) -> str:
    """Markdown: the throughput/memory table and the longest-sequence table."""
    runs = [r for r in report["runs"] if r.get("steps", 1) > 0 and "impl" in r]
    by_key = {_key(r): r for r in runs}
    peak = report["peak_tflops"]
    mem_unit = "GiB (CUDA max allocated)" if report["device"] == "cuda" else "GiB (process max RSS)"
    lines = [
        f"| model | mode | seq | batch | lorakit tok/s | PEFT tok/s | speed ours/theirs | lorakit peak {mem_unit} "
        "| PEFT peak | memory ours/theirs | lorakit MFU | PEFT MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in runs:
        k = _key(r)[:3]
        if k in seen:
            continue
        seen.add(k)
        ours, theirs = by_key.get((*k, "lorakit"), {}), by_key.get((*k, "peft"), {})

        def cell(x: dict[str, Any], field: str, scale: float = 1.0, spec: str = ".0f") -> str:
            if not x:
                return "-"
            if not x.get("ok"):
                return x.get("error", "failed")
            v = x.get(field)
            return _fmt(None if v is None else v / scale, spec)

        def ratio(field: str, ours: dict[str, Any] = ours, theirs: dict[str, Any] = theirs) -> str:
            a, b = ours.get(field), theirs.get(field)
            return _fmt(a / b if a and b else None, ".2f")

        m_o, m_t = _mfu(ours, peak), _mfu(theirs, peak)
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {r.get('batch')} | {cell(ours, 'tokens_per_s')} "
            f"| {cell(theirs, 'tokens_per_s')} | {ratio('tokens_per_s')} | {cell(ours, 'peak_bytes', GIB, '.2f')} "
            f"| {cell(theirs, 'peak_bytes', GIB, '.2f')} | {ratio('peak_bytes')} "
            f"| {_pct(m_o)} | {_pct(m_t)} |"
        )
    probes = [r for r in report["runs"] if r.get("probe")]
    if probes:
        lines += [
            "",
            "| model | mode | longest seq at batch 1: lorakit | PEFT | ours/theirs |",
            "|---|---|---|---|---|",
        ]
        pairs: dict[tuple, dict[str, Any]] = {}
        for r in probes:
            pairs.setdefault((r["model"], r["mode"]), {})[r["impl"]] = r

        def seq_cell(x: dict[str, Any] | None) -> str:
            if not x or "longest_seq" not in x:
                return "-" if not x else x.get("error", "failed")
            note = " (offload)" if x.get("offload") else ""
            return f"{'>= ' if x['longest_seq_capped'] else ''}{x['longest_seq']}{note}"

        for (model, mode), pair in pairs.items():
            a, b = pair.get("lorakit", {}).get("longest_seq"), pair.get("peft", {}).get("longest_seq")
            lines.append(
                f"| {model} | {mode} | {seq_cell(pair.get('lorakit'))} | {seq_cell(pair.get('peft'))} "
                f"| {_fmt(a / b if a and b else None, '.2f')} |"
            )
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    env = report["env"]
    where = (
        f"{env.get('device_name')} (driver {report['driver']}, CUDA {env.get('cuda')})"
        if report["device"] == "cuda"
        else "CPU, toy size (a smoke test of the scripts: its figures say nothing about GPU speed)"
    )
    peak = f"Peak used for MFU: {report['peak_tflops']} TFLOP/s." if report["peak_tflops"] else "No MFU (no peak)."
    return (
        f"Run {report['date']} on {where}: `{report['command']}`. torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}, "
        f"triton {env.get('triton')}, lorakit {env.get('lorakit')}. {peak}"
    )


def write_docs(report: dict[str, Any], docs: Path = DOCS) -> None:
    """Replace the block between the BEGIN/END markers in the docs page by this run's header and tables."""
    text = docs.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{docs} has no '{BEGIN}' ... '{END}' block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{BEGIN}\n{header(report)}\n\n{tables(report)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-toy", action="store_true", help="toy model on CPU (sets the defaults below)")
    p.add_argument("--models", nargs="+", default=None, help="default: llama-3.2-1b llama-3.1-8b (toy: toy)")
    p.add_argument("--modes", nargs="+", default=["lora16", "qlora"], choices=["lora16", "qlora"])
    p.add_argument("--impls", nargs="+", default=["lorakit", "peft"], choices=["lorakit", "peft"])
    p.add_argument("--seqs", nargs="+", type=int, default=None, help="default: 2048 8192 (toy: 64 256)")
    p.add_argument(
        "--tokens-per-step", type=int, default=None, help="batch = max(1, this // seq); default 16384 (toy: 256)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 5 (toy: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 2 (toy: 1)")
    p.add_argument(
        "--probe-seqs",
        nargs="*",
        type=int,
        default=None,
        help="batch-1 lengths tried for the longest-sequence table; empty list to skip "
        "(default 8192 ... 131072; toy: 512 1024)",
    )
    p.add_argument(
        "--no-probe-offload",
        dest="probe_offload",
        action="store_false",
        help="probe lorakit without activation offloading",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 dense TFLOP/s for MFU")
    p.add_argument("--jobs", type=int, default=1, help="workers at once; >1 only with --cpu-toy (GPU peaks would mix)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/gpu/results-{gpu,cpu-toy}.json)")
    p.add_argument("--write-docs", action="store_true", help="fill the results block of docs/benchmarks.md")
    args = p.parse_args(argv)
    toy = args.cpu_toy
    args.device = "cpu" if toy else "cuda"
    defaults = dict(
        models=["toy"] if toy else ["llama-3.2-1b", "llama-3.1-8b"],
        seqs=[64, 256] if toy else [2048, 8192],
        tokens_per_step=256 if toy else 16384,
        steps=2 if toy else 5,
        warmup=1 if toy else 2,
        probe_seqs=[512, 1024] if toy else [8192, 16384, 32768, 65536, 131072],
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not toy and args.device == "cuda" and _driver() is None:
        print("warning: nvidia-smi not found; is there a CUDA GPU? (use --cpu-toy on CPU)", file=sys.stderr)

    if args.jobs > 1 and not toy:
        raise ValueError(f"--jobs {args.jobs}: on a GPU the workers must run one at a time (memory peaks would mix)")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each worker is its own process
        results = list(pool.map(lambda argv: _run_worker(argv, args.timeout), _plan(args)))
    env = next((r["env"] for r in results if "env" in r), {})
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/gpu/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device,
        "driver": None if toy else _driver(),
        "env": env,
        "peak_tflops": None if toy else _peak_for(env.get("device_name", ""), args.peak_tflops),
        "runs": results,
    }
    out = args.out or HERE / ("results-cpu-toy.json" if toy else "results-gpu.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(header(report) + "\n\n" + tables(report))
    print(f"\nJSON: {out}")
    if args.write_docs:
        write_docs(report)
        print(f"tables written to {DOCS}")
    failed = [r for r in results if not r.get("ok") and r.get("error") != "out of memory"]
    if failed:
        print(f"{len(failed)} worker(s) failed: " + "; ".join(r.get("error", "?") for r in failed), file=sys.stderr)
        for r in failed:
            print(r.get("log_tail", ""), file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(1 if any(not r.get("ok") and r.get("error") != "out of memory" for r in main()["runs"]) else 0)
