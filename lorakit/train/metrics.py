"""Training metrics: `metrics.jsonl`, TensorBoard events (when installed), a PNG plot, peak memory."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def format_bytes(n: float) -> str:
    """`n` bytes in binary units, B up to PiB (so an estimate for a huge batch reads 3.2 PiB, not 3355443.2 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with NaN / inf floats as None (null): ``json.dumps`` would write NaN, which is not JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line; None for a line cut short by a killed run."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLogger:
    """Append-only metric records on the main process; a no-op on the others.

    Each record is one JSON line ``{"step": ..., "<name>": value, ...}``. On resume the file is cut back to
    the records written before the checkpoint (`resume_records`; a checkpoint without the count: its step), so
    the log of a resumed run equals the log of an uninterrupted one.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool,
                 resume_step: int | None = None, resume_records: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            records = [r for r in map(_record, self.path.read_text().splitlines()) if r is not None]
            # the records the checkpoint had seen (a final eval logged after it is not kept); else by step
            self.records = (records[:resume_records] if resume_records is not None
                            else [r for r in records if r["step"] <= resume_step])
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("[lorakit] tensorboard is not installed: no TensorBoard events (metrics.jsonl still "
                      "written). `pip install tensorboard` to get them.")
            else:
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = json_safe({"step": step, **values})
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(name.replace("_", "/", 1), value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def plot(self, output_dir: str | os.PathLike) -> Path | None:
        """Train/eval loss, learning rate and (preference methods) reward margins and accuracies against step, as PNG
        (None when matplotlib is missing)."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("[lorakit] matplotlib is not installed: no loss plot (`pip install matplotlib`).")
            return None
        rewards = ("rewards/margins", "rewards/accuracies", "eval_rewards/accuracies", "preference_accuracy",
                   "eval_preference_accuracy")  # preference methods: a third panel
        series = {name: [(r["step"], r[name]) for r in self.records if r.get(name) is not None]
                  for name in ("train_loss", "eval_loss", "learning_rate", *rewards)}
        panels = 3 if series["rewards/margins"] else 2
        fig, (ax_loss, ax_lr, *ax_reward) = plt.subplots(panels, 1, figsize=(7, 3 * panels), sharex=True)
        for name in rewards if ax_reward else ():
            if series[name]:
                xs, ys = zip(*series[name], strict=True)
                ax_reward[0].plot(xs, ys, marker="o" if name.startswith("eval_") else None, label=name)
        if ax_reward:
            ax_reward[0].set_ylabel("rewards / accuracy")
            ax_reward[0].legend(fontsize="small")
            ax_reward[0].grid(alpha=0.3)
        for name in ("train_loss", "eval_loss"):
            if series[name]:
                xs, ys = zip(*series[name], strict=True)
                ax_loss.plot(xs, ys, marker="o" if name == "eval_loss" else None, label=name)
        ax_loss.set_ylabel("loss (per label token)" if panels == 2 else "loss (per pair / completion)")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        if series["learning_rate"]:
            xs, ys = zip(*series["learning_rate"], strict=True)
            ax_lr.plot(xs, ys, color="tab:green")
        ax_lr.set_ylabel("learning rate")
        (ax_reward or [ax_lr])[-1].set_xlabel("optimizer step")
        ax_lr.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(output_dir) / PLOT_FILE
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
