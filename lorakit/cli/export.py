"""`lorakit export`: argument parsing for the GGUF / LoRA-GGUF / Ollama writers in lorakit.export."""

from __future__ import annotations

import argparse

FORMATS = ("gguf", "gguf-lora", "ollama")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `export` verb on the `lorakit` subcommand parser."""
    p = sub.add_parser("export", help="write a model (+ merged adapter) as GGUF, a LoRA GGUF, or an Ollama folder",
                       description="gguf: base (+ --adapter merged in float32) -> one GGUF file (llama.cpp, LM "
                       "Studio). gguf-lora: --adapter alone -> llama.cpp LoRA GGUF (llama-cli -m BASE.gguf --lora "
                       "FILE). ollama: a folder with model.gguf and a Modelfile (ollama create NAME -f Modelfile).")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--base", default=None, help="base model: a folder with config.json, or a .gguf file (gguf, "
                   "ollama: required; gguf-lora: only its config is read, default the adapter's base model)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format); required for gguf-lora")
    p.add_argument("--out", required=True, help="output .gguf file (gguf, gguf-lora) or folder (ollama); written "
                   "atomically, never over an input")
    p.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="type of 2-D weights (default: f16 for gguf, q8_0 for ollama, f32 for gguf-lora)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from lorakit.export import export_gguf, export_gguf_lora, export_ollama

    progress = not args.no_progress
    if args.format == "gguf-lora":
        if args.adapter is None:
            raise ValueError("--format gguf-lora needs --adapter (the adapter folder to convert)")
        export_gguf_lora(args.adapter, args.out, base=args.base, outtype=args.outtype or "f32", progress=progress)
        return 0
    if args.base is None:
        raise ValueError(f"--format {args.format} needs --base (the model folder or .gguf file to export)")
    if args.format == "gguf":
        export_gguf(args.base, args.out, adapter=args.adapter, outtype=args.outtype or "f16", progress=progress)
    else:
        export_ollama(args.base, args.out, adapter=args.adapter, outtype=args.outtype or "q8_0", progress=progress)
    return 0
