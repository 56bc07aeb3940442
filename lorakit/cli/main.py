"""The `lorakit` command: train, preprocess, merge, push, generate, chat, inspect, estimate, export, serve.

Each verb is a small function taking the parsed arguments; the heavy imports (torch, transformers) happen
inside them so `lorakit --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Sequence

from lorakit.cli.common import positive_int, shard_size
from lorakit.cli.export import add_export_parser
from lorakit.cli.generate import add_generate_arguments, run_chat, run_generate
from lorakit.cli.push import add_push_arguments, run_push
from lorakit.cli.serve import add_parser as add_serve_parser


def _train(args: argparse.Namespace) -> int:
    from lorakit.train.checkpoint import latest_checkpoint
    from lorakit.train.config import load_config
    from lorakit.train.loop import train

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, resume=True if args.resume else None)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGINT / SIGTERM turned into TrainingInterrupted by the loop
        if os.environ.get("LORAKIT_TRACEBACK"):
            raise
        signum = getattr(err, "signum", signal.SIGINT)
        written = getattr(err, "checkpoint", None)
        latest = written or latest_checkpoint(cfg.training.output_dir)
        rerun = shlex.join(["lorakit", "train", args.config, *args.overrides, "--resume"])
        print(f"lorakit train: {'interrupted' if signum == signal.SIGINT else signal.Signals(signum).name}; " + (
            f"checkpoint written at step {err.step}: {written}; continue with `{rerun}`" if written else
            f"the newest complete checkpoint is {latest}: continue with `{rerun}`" if latest is not None else
            f"no checkpoint was written yet (training.save_steps={cfg.training.save_steps}), so there is "
            "nothing to resume: run it again from the start"), file=sys.stderr)
        return 128 + signum
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun: a rank exiting with it alive can abort
        dist.destroy_process_group()
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from lorakit.quant.gguf_in import pretrained_args
    from lorakit.train.config import load_config
    from lorakit.train.data import build_datasets, format_debug, pack_examples
    from lorakit.train.evaluate import generation_examples, model_path_errors

    cfg = load_config(args.config, args.overrides)
    source, gguf = pretrained_args(cfg.model.name_or_path)  # a .gguf model: its folder and gguf_file=
    with model_path_errors(cfg.model.name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision,
                                                  trust_remote_code=cfg.model.trust_remote_code, **gguf)
    if cfg.method != "sft":  # preference pairs / KTO rows, each shown with its masks
        from lorakit.train.preference_data import build_preference_datasets, format_pair_debug

        rows, _, stats = build_preference_datasets(cfg.data, cfg.method, tokenizer, cfg.training.max_seq_length)
        for key, value in stats.items():
            print(f"{key:<28} {value}")
        for i, row in enumerate(rows[: args.num_examples] if args.debug else []):
            print(f"\n=== train record {i} ===\n{format_pair_debug(row, tokenizer)}")
        return 0
    train_ex, eval_ex, stats = build_datasets(cfg.data, tokenizer, cfg.training.max_seq_length)
    for key, value in stats.items():
        print(f"{key:<28} {value}")
    if cfg.training.packing:
        packed = pack_examples(train_ex, cfg.training.max_seq_length)
        print(f"{'train_packed_rows':<28} {len(packed)}  (packing into {cfg.training.max_seq_length} tokens)")
    ev = cfg.evaluation
    if ev.path:  # the exact-match file fails here as it would in `train`, not after training started
        prompts, skipped = generation_examples(ev.path, cfg.data, tokenizer, ev.max_examples,
                                               cfg.training.max_seq_length, stats["format"], ev.prompt_field,
                                               ev.answer_field)
        print(f"{'exact_match_prompts':<28} {len(prompts)}" + (f"  ({skipped} skipped: answer cut off by "
                                                                f"max_seq_length)" if skipped else ""))
    if args.debug:
        for i, ex in enumerate(train_ex[: args.num_examples]):
            print(f"\n=== train example {i} ===")
            print(format_debug(ex["input_ids"], ex["labels"], tokenizer))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lorakit.cli.merge import merge_to_disk

    out = merge_to_disk(args.base, args.adapter, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)
    print(f"[lorakit] merged model written to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lorakit.cli.inspect import inspect_model

    print(inspect_model(args.model, ranks=args.ranks, trust_remote_code=args.trust_remote_code))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from lorakit.cli.inspect import estimate_report

    ignored = []  # flags the method would ignore: refused rather than printing the report without them
    if args.method == "full":
        ignored += [flag for flag, value in (("--r", args.r), ("--target", args.target)) if value is not None]
    if args.double_quant and args.method != "qlora":
        ignored.append("--double-quant")
    if ignored:
        raise ValueError(f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to --method "
                         f"{args.method}: --r and --target size the adapter of lora / qlora, --double-quant the "
                         "4-bit weights of qlora")
    print(estimate_report(args.model, args.method, args.seq_len, args.batch_size, args.r or 16,
                          args.target or "all-linear", args.dtype, chunked_loss=not args.no_chunked_loss,
                          double_quant=args.double_quant))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA / QLoRA fine-tuning toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a LoRA adapter from a YAML config")
    p.add_argument("config", help="YAML config file (see examples/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value overrides, e.g. training.learning_rate=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("preprocess", help="tokenize the data of a config and report (--debug: token by token)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", default=[])
    p.add_argument("--debug", action="store_true", help="print the first examples token by token with labels")
    p.add_argument("--num-examples", type=positive_int, default=3)
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("merge", help="fold an adapter into its full-precision base and save it")
    p.add_argument("--base", required=True, help="base model (full precision, even for QLoRA adapters)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", required=True, help="output folder (written atomically; must be new, empty or an "
                   "earlier merge output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that is not an earlier merge output (never the inputs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"])
    p.add_argument("--max-shard-size", type=shard_size, default="2GB", help="safetensors shard size (KB, MB, GB, TB)")
    p.set_defaults(func=_merge)

    p = sub.add_parser("push", help="upload an adapter or merged-model folder to the Hugging Face Hub")
    add_push_arguments(p)
    p.set_defaults(func=run_push)

    p = sub.add_parser("generate", help="generate from a prompt with a base model and optional adapters")
    add_generate_arguments(p)
    p.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for several)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="interactive chat; /adapter NAME switches adapters, /help lists commands")
    add_generate_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=run_chat)

    p = sub.add_parser("inspect", help="linear modules, suggested target_modules, LoRA parameters per rank")
    p.add_argument("model", help="Hub id or folder with config.json (no weights are read)")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("estimate", help="training memory: weights, adapters, gradients, optimizer, activations")
    p.add_argument("model", help="Hub id or folder with config.json (no weights are read)")
    p.add_argument("--method", required=True, choices=["full", "lora", "qlora"])
    p.add_argument("--seq-len", type=positive_int, required=True)
    p.add_argument("--batch-size", type=positive_int, required=True)
    p.add_argument("--r", type=positive_int, default=None, help="LoRA rank (lora / qlora; default 16)")
    p.add_argument("--target", default=None,
                   help="all-linear (default) | attention | one module name (lora / qlora)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-chunked-loss", action="store_true", help="count the full (B*T, V) logits")
    p.add_argument("--double-quant", action="store_true", help="qlora: double-quantized absmax")
    p.set_defaults(func=_estimate)

    add_export_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors (bad config, missing file, unsupported option) print one line and exit 2,
    Ctrl-C prints one line (for train: the checkpoint to resume from) and exits 130 (train: 143 on SIGTERM).

    Set LORAKIT_TRACEBACK=1 to see the full traceback instead.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `train cfg.yaml --resume key=value`: overrides may come after the flags too
        if args.command not in ("train", "preprocess") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError, ConnectionError) as err:
        if os.environ.get("LORAKIT_TRACEBACK"):
            raise
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback (train says how to resume, in _train)
        if os.environ.get("LORAKIT_TRACEBACK"):
            raise
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
