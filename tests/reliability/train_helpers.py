"""Helpers of the training reliability tests: runs in-process and as `lorakit train` subprocesses.

(Not a conftest: the library-side reliability tests live beside these with their own helpers.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json writes, and no other JSON reader takes)."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def same_adapter(a: Path, b: Path) -> bool:
    """Bitwise equal adapter_model.safetensors."""
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def train_process(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`lorakit train CONFIG ...` as a child process (stdout discarded, stderr kept)."""
    cmd = [sys.executable, "-m", "lorakit.cli.main", "train", str(config), *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("LORAKIT_TRACEBACK", None)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env)


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Wait until metrics.jsonl of `out` records `step` (logging_steps=1)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached (exit {proc.poll()}): {proc.stderr.read() if proc.poll() else ''}")


def config_maker(tmp_path: Path, model_dir: Path, config_writer: Any):
    """`make(name, data=None, **training)` -> (config path, output_dir): the tiny model, 32 records, lr 1e-2."""
    def make(name: str = "run", data: dict | None = None, **training):
        out = tmp_path / name
        sections = {"training": {"logging_steps": 1, **training}}
        if data:
            sections["data"] = data
        return config_writer(tmp_path / f"{name}.yaml", model_dir, out, **sections), out

    return make
