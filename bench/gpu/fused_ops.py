"""Fused paths vs the plain autograd paths, op by op: step time (forward + backward) and activation memory.

    python bench/gpu/fused_ops.py            # CUDA when available, else CPU
    python bench/gpu/fused_ops.py --device cpu --tokens 2048

Pairs, each measured in this one process, same inputs:
  - LoRA linear: lorakit's ``LoraLinear`` wrapper (bf16 base, fp32 adapter, dropout 0.1) vs ``lora_linear``
  - LoRA MLP: gate/up/down ``LoraLinear`` + ``silu(g) * u`` vs ``lora_mlp``
  - LM loss: full logits + ``F.cross_entropy`` vs ``chunked_lm_loss`` (frozen head)

"saved" is the bytes autograd keeps for the backward (counted by saved-tensor hooks; device independent).
On CUDA, "peak" is the max allocated memory of the step above what was allocated before it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import AdapterSpec
from lorakit.kernels.chunked_ce import chunked_lm_loss
from lorakit.kernels.lora_fused import LoraProjection, lora_linear, lora_mlp
from lorakit.layers import LoraLinear

MIB = 1024**2


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # shared storage counted once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _measure(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> dict[str, float]:
    saved, out = _saved_bytes(fn)
    out.float().sum().backward()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(reps):
        fn().float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / reps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / MIB if device.type == "cuda" else None
    return {"ms": ms, "saved_mib": saved / MIB, "peak_mib": peak}


def _lora_linear_module(d_in: int, d_out: int, r: int, dtype: torch.dtype, device: torch.device) -> LoraLinear:
    base = nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=device).requires_grad_(False)
    layer = LoraLinear(base, d_in, d_out, fan_in_fan_out=False)
    spec = AdapterSpec(r=r, lora_alpha=2 * r, lora_dropout=0.1, init_lora_weights=False)
    adapter = layer.add_adapter("default", spec)
    layer.set_active(["default"])
    adapter.train()
    return layer


def _projection(layer: LoraLinear) -> LoraProjection:
    a = layer.adapters["default"]
    return LoraProjection(layer.base_layer.weight, None, a.lora_A.weight, a.lora_B.weight, a.scaling, 0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    device, dtype, r = torch.device(args.device), torch.bfloat16, 16
    torch.manual_seed(0)
    m, h, i = args.tokens, args.hidden, args.intermediate
    x = torch.randn(m, h, dtype=dtype, device=device, requires_grad=True)
    rows = []

    layer = _lora_linear_module(h, h, r, dtype, device)
    proj = _projection(layer)
    rows.append(
        (
            "LoRA linear",
            _measure(lambda: layer(x), device, args.reps),
            _measure(
                lambda: lora_linear(x, proj.weight, None, proj.lora_A, proj.lora_B, proj.scaling, 0.1, True),
                device,
                args.reps,
            ),
        )
    )

    gate, up, down = (
        _lora_linear_module(h, i, r, dtype, device),
        _lora_linear_module(h, i, r, dtype, device),
        _lora_linear_module(i, h, r, dtype, device),
    )
    pg, pu, pd = _projection(gate), _projection(up), _projection(down)
    rows.append(
        (
            "LoRA MLP (SwiGLU)",
            _measure(lambda: down(F.silu(gate(x)) * up(x)), device, args.reps),
            _measure(lambda: lora_mlp(x, pg, pu, pd, training=True), device, args.reps),
        )
    )

    head = torch.randn(args.vocab, h, dtype=dtype, device=device) / h**0.5
    labels = torch.randint(0, args.vocab, (m,), device=device)
    rows.append(
        (
            "LM head + CE",
            _measure(lambda: F.cross_entropy(F.linear(x, head).float(), labels), device, args.reps),
            _measure(lambda: chunked_lm_loss(x, head, labels, reduction="mean"), device, args.reps),
        )
    )

    print(f"device={device} tokens={m} hidden={h} intermediate={i} vocab={args.vocab} r={r} bf16, reps={args.reps}")
    print(
        "| op | plain ms | fused ms | time fused/plain | plain saved MiB | fused saved MiB | saved fused/plain"
        + (" | plain peak MiB | fused peak MiB |" if device.type == "cuda" else " |")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if device.type == "cuda" else ""))
    for name, plain, fused in rows:
        line = (
            f"| {name} | {plain['ms']:.1f} | {fused['ms']:.1f} | {fused['ms'] / plain['ms']:.2f} "
            f"| {plain['saved_mib']:.1f} | {fused['saved_mib']:.1f} | {fused['saved_mib'] / plain['saved_mib']:.2f} |"
        )
        if device.type == "cuda":
            line += f" {plain['peak_mib']:.0f} | {fused['peak_mib']:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
