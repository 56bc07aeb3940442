"""Core LoRA benchmark (CPU): lorakit vs PEFT vs the frozen-base limit, side by side in one run.

    python bench/bench_core.py [--steps 6] [--quick]

Model: Llama, hidden 512, 8 layers, intermediate 1376, vocab 8000, batch 4 x 256, LoRA r=16 on all linear layers.
- training step (forward + backward + AdamW on the adapters) for lorakit (default and with the opt-in fused
  LoRA autograd, ``enable_fused_lora``) and PEFT, with dropout 0 and 0.05;
- the limit: forward + backward of the frozen base alone (gradients to activations only, no adapters);
- unmerged inference forward (lorakit, PEFT) vs the base forward;
- ``get_peft_model`` time on a meta-device model with 10,240 linear layers (lorakit vs PEFT).
Runs are interleaved (ours, PEFT, limit, ours, ...) and the median is reported, so both sides see the same load.
The ratios to the limit are also given as the median of per-round ratios ("per round"): on a shared machine whose
speed drifts by 10-20% within a minute, a round's steps see the same drift, so this is the steadier figure.

Minor page faults per step are printed too. glibc's malloc gives large freed blocks back to the kernel (munmap of
an mmapped block, or a trim of its heap's top) as its dynamic thresholds decide, and the next allocation of that
size faults every 4 KiB page in again: 8,000 faults for one (1024, 8000) fp32 logits tensor, ~50 ms of a step
here (profiled: fill_ 48 ms vs 1 ms when the block was reused). Which variant refaults, and how often, depends on
its allocation history, not on its arithmetic. To measure without that (every variant keeps its freed blocks):

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 python bench/bench_core.py
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def _model(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256 if quick else 512,
        intermediate_size=688 if quick else 1376,
        num_hidden_layers=2 if quick else 8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8000,
    )
    return LlamaForCausalLM(cfg)


def _wrap(kind: str, base: nn.Module, dropout: float) -> nn.Module:
    if kind == "limit":
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward reaches every layer, as with adapters
        return model
    lib = __import__("peft" if kind == "peft" else "lorakit")
    cfg = lib.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    model = lib.get_peft_model(copy.deepcopy(base), cfg)
    if kind == "lorakit-fused":
        model.enable_fused_lora()
    return model


def _train_step(model: nn.Module, opt: torch.optim.Optimizer | None, ids: torch.Tensor) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _time(fn, reps: int, faults: list[int] | None = None) -> list[float]:
    """Wall times of ``reps`` calls; with ``faults``, each call's minor page faults are appended to it."""
    out = []
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if faults is not None:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out


def bench_training(
    base: nn.Module, ids: torch.Tensor, dropout: float, steps: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median step time per variant, the median over rounds of each variant's step time / the limit's, and the
    median minor page faults per step (see the module docstring: a step that refaults its logits pays ~50 ms)."""
    models = {k: _wrap(k, base, dropout) for k in ("lorakit", "lorakit-fused", "peft", "limit")}
    opts = {
        k: (torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) if k != "limit" else None)
        for k, m in models.items()
    }
    for m in models.values():
        m.train()
    times: dict[str, list[float]] = {k: [] for k in models}
    faults: dict[str, list[int]] = {k: [] for k in models}
    for k, m in models.items():  # warm-up
        _train_step(m, opts[k], ids)
    for _ in range(steps):
        for k, m in models.items():
            times[k] += _time(lambda m=m, k=k: _train_step(m, opts[k], ids), 1, faults[k])
    limit = times["limit"]
    per_round = {k: statistics.median([a / b for a, b in zip(v, limit, strict=True)]) for k, v in times.items()}
    return (
        {k: statistics.median(v) for k, v in times.items()}, per_round,
        {k: statistics.median(v) for k, v in faults.items()},
    )


def bench_inference(base: nn.Module, ids: torch.Tensor, steps: int) -> dict[str, float]:
    models = {"lorakit": _wrap("lorakit", base, 0.0), "peft": _wrap("peft", base, 0.0), "base": base}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()
            m(input_ids=ids)
        for _ in range(steps):
            for k, m in models.items():
                times[k] += _time(lambda m=m: m(input_ids=ids), 1)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_injection(n_blocks: int) -> dict[str, float]:
    import peft

    import lorakit

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(32))

    out = {}
    for name, lib in (("lorakit", lorakit), ("peft", peft)):
        with torch.device("meta"):
            model = nn.Sequential(*[Block() for _ in range(n_blocks)])
        cfg = lib.LoraConfig(r=16, target_modules=[f"layers.{i}" for i in range(32)])
        t0 = time.perf_counter()
        lib.get_peft_model(model, cfg)
        out[name] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="toy sizes (for CI smoke runs)")
    parser.add_argument("--inject-blocks", type=int, default=320, help="blocks of 32 linears for injection")
    args = parser.parse_args()
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"threads {torch.get_num_threads()}")
    base = _model(args.quick)
    ids = torch.randint(0, 8000, (4, 64 if args.quick else 256), generator=torch.Generator().manual_seed(0))
    for dropout in (0.0, 0.05):
        t, per_round, faults = bench_training(base, ids, dropout, args.steps)
        print(
            f"train step, dropout {dropout}: lorakit {t['lorakit'] * 1e3:.1f} ms | lorakit-fused "
            f"{t['lorakit-fused'] * 1e3:.1f} ms | peft {t['peft'] * 1e3:.1f} ms | limit {t['limit'] * 1e3:.1f} ms || "
            f"lorakit/peft {t['lorakit'] / t['peft']:.3f} | fused/peft {t['lorakit-fused'] / t['peft']:.3f} | "
            f"lorakit/limit {t['lorakit'] / t['limit']:.3f} | fused/limit {t['lorakit-fused'] / t['limit']:.3f} | "
            f"peft/limit {t['peft'] / t['limit']:.3f} || per round: lorakit/limit {per_round['lorakit']:.3f} | "
            f"fused/limit {per_round['lorakit-fused']:.3f} | peft/limit {per_round['peft']:.3f} || page faults per "
            f"step: " + " | ".join(f"{k} {v:.0f}" for k, v in faults.items())
        )
    t = bench_inference(base, ids, args.steps)
    print(
        f"inference forward (unmerged): lorakit {t['lorakit'] * 1e3:.1f} ms | peft {t['peft'] * 1e3:.1f} ms | "
        f"base {t['base'] * 1e3:.1f} ms || lorakit/base {t['lorakit'] / t['base']:.3f} | "
        f"peft/base {t['peft'] / t['base']:.3f}"
    )
    t = bench_injection(8 if args.quick else args.inject_blocks)
    n = (8 if args.quick else args.inject_blocks) * 32
    print(
        f"get_peft_model on a meta model with {n} linear targets: lorakit {t['lorakit']:.2f} s | "
        f"peft {t['peft']:.2f} s || peft/lorakit {t['peft'] / t['lorakit']:.1f}x"
    )


if __name__ == "__main__":
    main()
