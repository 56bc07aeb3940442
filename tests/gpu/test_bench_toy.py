"""The GPU benchmark's scripts at toy size on CPU (not a GPU test: it keeps bench/gpu/ working in CI).

One worker process per implementation (lorakit, transformers + PEFT + bitsandbytes), QLoRA, 1 step, the two
workers side by side (--jobs 2): about 14 s of CPU time, most of it importing torch/transformers.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_gpu_{name}", ROOT / "bench" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_toy_runs_both_sides(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "toy.json"
    cmd = [sys.executable, "bench/gpu/run.py", "--cpu-toy", "--modes", "qlora", "--seqs", "32", "--steps", "1",
           "--warmup", "0", "--probe-seqs", "--jobs", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {r["impl"] for r in report["runs"]} == {"lorakit", "peft"}
    for r in report["runs"]:
        assert r["ok"] and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
        assert r["trainable_params"] == report["runs"][0]["trainable_params"]  # same adapters on both sides
    assert "| toy | qlora | 32 |" in proc.stdout


def test_flops_formula_counts_the_model_matmul_weights():
    worker = _load("worker")
    spec = worker.MODELS["toy"]
    model = LlamaForCausalLM(LlamaConfig(**spec))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_head = spec["vocab_size"] * spec["hidden_size"]
    n_layers = linear - n_head
    r, seq = worker.LORA_R, 100
    layers, h, inter = spec["num_hidden_layers"], spec["hidden_size"], spec["intermediate_size"]
    d_q, d_kv = spec["num_attention_heads"] * spec["head_dim"], spec["num_key_value_heads"] * spec["head_dim"]
    n_lora = layers * r * (4 * h + 2 * d_q + 2 * d_kv + 3 * (h + inter))
    expected = 6 * n_layers + 4 * n_head + 8 * n_lora + 8 * layers * seq * d_q
    assert worker.flops_per_token(spec, seq) == expected


def test_write_docs_fills_only_the_marked_block(tmp_path):
    run = _load("run")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\n## Other\nkeep\n\n## GPU\n{run.BEGIN}\nold\n{run.END}\nafter\n")
    report = {
        "date": "2026-11-24", "command": "python bench/gpu/run.py", "device": "cuda", "driver": "1.0",
        "peak_tflops": 989.0, "env": {"device_name": "NVIDIA H100", "torch": "x"},
        "runs": [
            dict(impl=i, model="m", mode="qlora", seq=2048, batch=8, steps=5, ok=True, tokens_per_s=t,
                 peak_bytes=b, model_flops_per_token=1e9)
            for i, t, b in (("lorakit", 2000.0, 2 * 1024**3), ("peft", 1000.0, 4 * 1024**3))
        ],
    }  # fmt: skip
    run.write_docs(report, doc)
    text = doc.read_text()
    assert "old" not in text and "keep" in text and text.endswith("after\n")
    assert "| m | qlora | 2048 | 8 | 2000 | 1000 | 2.00 | 2.00 | 4.00 | 0.50 | 0.2% | 0.1% |" in text
