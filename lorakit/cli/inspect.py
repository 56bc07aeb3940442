"""`lorakit inspect` and `lorakit estimate`: reports built from config.json alone (meta device)."""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.train.estimate import (
    estimate_memory,
    linear_groups,
    lora_parameters,
    meta_model,
    suggest_target_modules,
)
from lorakit.train.metrics import format_bytes


def inspect_model(name_or_path: str, ranks: Sequence[int] = (4, 8, 16, 32, 64),
                  trust_remote_code: bool = False) -> str:
    """Linear modules grouped by name, suggested target_modules, LoRA parameters per rank."""
    model = meta_model(name_or_path, trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    groups = linear_groups(model)
    lines = [f"{name_or_path}: {type(model).__name__}, {n_params:,} parameters (from its config, meta device)",
             "", f"{'module':<20} {'count':>5}  {'in -> out':<16} {'attention':<9} example path"]
    for g in groups.values():
        shape = f"{g.shape[0]} -> {g.shape[1]}"
        lines.append(f"{g.name:<20} {len(g.paths):>5}  {shape:<16} {'yes' if g.is_attention else '':<9} "
                     f"{g.paths[0]}")
    output = model.get_output_embeddings()
    if output is not None:
        lines.append(f"(output layer, never targeted by all-linear: {type(output).__name__} "
                     f"{output.weight.shape[1]} -> {output.weight.shape[0]})")
    targets = suggest_target_modules(groups)
    lines += ["", "suggested target_modules:",
              f"  attention only (LoRA paper):      {targets['attention']}",
              "  all linear layers (QLoRA paper):  all-linear  = " + str(targets["all-linear"]), "",
              f"{'rank':>5}  {'attention-only':>16} {'%':>8}  {'all-linear':>14} {'%':>8}"]
    for r in ranks:
        att = lora_parameters(groups, targets["attention"], r)
        full = lora_parameters(groups, targets["all-linear"], r)
        lines.append(f"{r:>5}  {att:>16,} {100 * att / n_params:>7.3f}%  {full:>14,} {100 * full / n_params:>7.3f}%")
    lines.append("(trainable LoRA parameters = r * sum(in + out) over the targeted layers; % of the base model)")
    return "\n".join(lines)


def estimate_report(name_or_path: str, method: str, seq_len: int, batch_size: int, r: int = 16,
                    target: str = "all-linear", dtype: str = "bfloat16", chunked_loss: bool = True,
                    double_quant: bool = False) -> str:
    """A table of the terms of `lorakit.train.estimate.estimate_memory` and the totals."""
    model = meta_model(name_or_path)
    est = estimate_memory(model, method, seq_len, batch_size, r=r, target=target, dtype=dtype,
                          chunked_loss=chunked_loss, double_quant=double_quant)
    rows = [("weights", est.weights), ("adapters (fp32)", est.adapters), ("gradients", est.gradients),
            ("optimizer states (AdamW)", est.optimizer),
            ("activations (no checkpointing)", est.activations),
            ("activations (gradient checkpointing)", est.activations_checkpointed),
            ("LM head logits + loss" + (" (chunked)" if chunked_loss else ""), est.lm_head)]
    lines = [f"{name_or_path}: method={method} dtype={dtype} seq_len={seq_len} batch_size={batch_size}"
             + ("" if method == "full" else f" r={r} target={target}"), ""]
    lines += [f"  {name:<40} {format_bytes(value):>12}" for name, value in rows]
    lines += ["", f"  {'total without gradient checkpointing':<40} {format_bytes(est.total(False)):>12}",
              f"  {'total with gradient checkpointing':<40} {format_bytes(est.total(True)):>12}",
              "(one process; excludes the framework's own overhead: CUDA context ~0.5 GiB, allocator slack)"]
    return "\n".join(lines)
