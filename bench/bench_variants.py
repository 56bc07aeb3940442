"""DoRA training step and mixed-adapter batches, lorakit vs PEFT, on CPU.

Model: a random Llama (hidden 256, intermediate 688, 2 layers, vocab 1024), LoRA r=16 on all linear layers.
Times are medians over ``--reps`` runs after 2 warm-ups (1 thread).

    python bench/bench_variants.py [--reps 10]
    python bench/bench_variants.py --dora-core --reps 5   # DoRA on bench_core.py's model (hidden 512, 8 layers)
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import bench_core  # bench/ is sys.path[0] when run as python bench/bench_variants.py
import peft
import torch
import transformers as tf

import lorakit


def _base():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4,
    )
    return tf.LlamaForCausalLM(cfg)


def _rounds(fns: list, reps: int, faults: list[list[int]] | None = None) -> list[list[float]]:
    """Times of each callable over ``reps`` rounds, taking turns (ours, theirs, ...) so that both sides of a ratio
    see the same machine load; two warm-up rounds first. With ``faults`` (one list per callable), each call's
    minor page faults are appended (see bench_core's docstring: glibc's refaults of freed blocks)."""
    for _ in range(2):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, (fn, ts) in enumerate(zip(fns, times, strict=True)):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
            if faults is not None:
                faults[i].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times


def _ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num / den: steadier than a ratio of medians on a machine whose speed drifts."""
    return statistics.median([a / b for a, b in zip(num, den, strict=True)])


def _step(model, ids):
    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def bench_dora(reps: int, core: bool = False) -> None:
    """DoRA vs LoRA vs PEFT's DoRA training steps; ``core``: on the core benchmark's model, batch 4 x 256."""
    base = bench_core._model(quick=False) if core else _base()
    ids = torch.randint(0, base.config.vocab_size, (4, 256 if core else 128))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    print(
        "| dropout | lorakit LoRA | lorakit DoRA | PEFT DoRA | ours/PEFT DoRA | DoRA/LoRA (ours) "
        "| page faults per step: LoRA / DoRA / PEFT DoRA |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in (0.0, 0.05):
        kw = dict(r=16, lora_alpha=32, target_modules=targets, lora_dropout=p)
        lora = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw)).train()
        dora = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(use_dora=True, **kw)).train()
        ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **kw)).train()
        faults: list[list[int]] = [[], [], []]
        times = _rounds([_step(m, ids) for m in (lora, dora, ref)], reps, faults)
        t_lora, t_dora, t_ref = (statistics.median(t) for t in times)
        f_lora, f_dora, f_ref = (int(statistics.median(f)) for f in faults)
        print(
            f"| {p} | {t_lora * 1e3:.1f} ms | {t_dora * 1e3:.1f} ms | {t_ref * 1e3:.1f} ms | "
            f"{t_dora / t_ref:.2f}x | {t_dora / t_lora:.2f}x | {f_lora} / {f_dora} / {f_ref} |"
        )


def _mixed_models() -> tuple[lorakit.PeftModel, peft.PeftModel, list[str]]:
    """The same 8 adapters (r=16, B != 0) in lorakit and PEFT, and 32 row names cycling through them."""
    base = _base().eval()
    kw = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    names = [f"a{i}" for i in range(8)]
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw), adapter_name=names[0])
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=names[0])
    for n in names[1:]:
        ours.add_adapter(n, lorakit.LoraConfig(**kw))
        ref.add_adapter(n, peft.LoraConfig(**kw))
    return ours.eval(), ref.eval(), [names[i % 8] for i in range(32)]


def bench_mixed(reps: int, tokens: int = 64) -> None:
    """32 rows x ``tokens`` tokens over 8 adapters (``tokens=1`` is a decode step, where per-op cost dominates).
    Our mixed batch runs twice: stacked for each call, and with a kept ``stack_adapters`` handle (serving)."""
    ours, ref, rows = _mixed_models()
    stack = ours.stack_adapters(sorted(set(rows)))
    ids = torch.randint(0, 1024, (32, tokens))
    with torch.no_grad():
        times = _rounds(
            [
                lambda: ours(input_ids=ids),
                lambda: ours(input_ids=ids, adapter_names=rows, adapter_stack=stack),
                lambda: ref(input_ids=ids, adapter_names=rows),
                lambda: ours(input_ids=ids, adapter_names=rows),
            ],
            reps,
        )
    _print_mixed(f"32 rows x {tokens} tokens:", times, 2)


def _print_mixed(title: str, times: list[list[float]], digits: int) -> None:
    """``times``: single adapter, mixed with a stack, PEFT mixed, mixed stacked per call. The PEFT/(ours, single
    adapter) column bounds PEFT/ours: a mixed batch does at least the single-adapter batch's work."""
    single, mixed, peft_mixed, per_call = (statistics.median(t) for t in times)
    print(title)
    print(
        "| single adapter (ours) | 8 adapters mixed, adapter_stack (ours) | mixed, stacked per call (ours) "
        "| 8 adapters mixed (PEFT) | mixed/single | PEFT/ours | per round: mixed/single | PEFT/ours "
        "| per call/stack | PEFT/(ours, single adapter) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {single * 1e3:.{digits}f} ms | {mixed * 1e3:.{digits}f} ms | {per_call * 1e3:.{digits}f} ms | "
        f"{peft_mixed * 1e3:.{digits}f} ms | {mixed / single:.2f}x | {peft_mixed / mixed:.2f}x | "
        f"{_ratio(times[1], times[0]):.2f}x | {_ratio(times[2], times[1]):.2f}x | {_ratio(times[3], times[1]):.2f}x | "
        f"{_ratio(times[2], times[0]):.2f}x |"
    )


def bench_mixed_generate(reps: int, prompt: int = 8, new_tokens: int = 16) -> None:
    """``generate`` on 32 rows over 8 adapters, greedy, exactly ``new_tokens`` steps: decode as served, where one
    call covers every step (a call's ``MixedBatch`` stacks each layer's factors once for all its steps)."""
    ours, ref, rows = _mixed_models()
    stack = ours.stack_adapters(sorted(set(rows)))
    ids = torch.randint(1, 1024, (32, prompt))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    times = _rounds(
        [
            lambda: ours.generate(input_ids=ids, **kw),
            lambda: ours.generate(input_ids=ids, adapter_names=rows, adapter_stack=stack, **kw),
            lambda: ref.generate(input_ids=ids, adapter_names=rows, **kw),
            lambda: ours.generate(input_ids=ids, adapter_names=rows, **kw),
        ],
        reps,
    )
    _print_mixed(f"generate, 32 rows x ({prompt} prompt + {new_tokens} new) tokens:", times, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dora-core", action="store_true", help="DoRA on the core benchmark's model only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dora_core:
        bench_dora(args.reps, core=True)
        return
    bench_dora(args.reps)
    print()
    bench_mixed(args.reps)
    print()
    bench_mixed(args.reps, tokens=1)
    print()
    bench_mixed_generate(args.reps)


if __name__ == "__main__":
    main()
