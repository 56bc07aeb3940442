"""`lorakit generate` and `lorakit chat`: a base model plus zero or more adapters, streamed output."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from lorakit.cli.common import DTYPES, damaged_file_errors, non_negative_int, positive_float, positive_int


def _top_p(text: str) -> float:
    """argparse type: a probability mass in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--top-p must be in (0, 1], got {text}")
    return value


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
"""Values of the sampling flags when not given; they apply with --do-sample only."""


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Greedy decoding ignores --temperature / --top-p / --top-k: refuse them without --do-sample."""
    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_DEFAULTS if getattr(args, name) is not None]
    if given and not args.do_sample:
        verb, them = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise ValueError(f"{' and '.join(given)} only {verb} when sampling, and decoding is greedy without "
                         f"--do-sample: add --do-sample, or drop {them}")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model (Hub id or folder)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter folder; repeat for several (the first is active; name defaults to the folder)")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=positive_float, default=None, help="with --do-sample (default 1.0)")
    p.add_argument("--top-p", type=_top_p, default=None, help="with --do-sample (default 1.0)")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="with --do-sample (default 50; 0: off)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """["name=path" | "path", ...] -> [(name, path)]; a bare path is named after its folder.

    A spec that is an existing path is a path (`out/lr=1e-3`); otherwise it is split on its first `=` when
    the part before it has no path separator (`name=out/lr=1e-3`). A folder name holding '.' (`work/adapter-v1.5`)
    gives the name with '_' for '.' (`adapter-v1_5`); a NAME given with '.' is refused, naming the NAME=PATH form.
    """
    from lorakit.adapter import reserved_names

    reserved = reserved_names()

    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if Path(spec).exists() or not sep or "/" in name or os.sep in name:
            name, path = "", spec
        elif "." in name or name in reserved:
            raise ValueError(f"--adapter {spec!r}: the adapter name {name!r} (NAME in NAME=PATH) must not contain '.' "
                             f"or be one of {sorted(reserved)}; e.g. --adapter v1_5=PATH")
        if not name:
            name = Path(path.rstrip("/")).name.replace(".", "_") or "default"
            if name in reserved:
                name = f"{name}_adapter"
        if name in {n for n, _ in out}:
            raise ValueError(f"two adapters named {name!r}: name them with NAME=PATH")
        out.append((name, path))
    return out


def load_with_adapters(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, adapter names): the base, then every adapter; the first one active."""
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.evaluate import is_local_path, load_base_model

    adapters = parse_adapters(args.adapter)
    for _, path in adapters:  # a missing folder fails now, not after the base loaded and the Hub was retried
        if not Path(path).exists() and (is_local_path(path) or "/" not in path):
            raise FileNotFoundError(f"--adapter {path!r}: no such folder (relative paths are taken from the "
                                    f"current directory, {os.getcwd()})")
    model, tokenizer = load_base_model(args.base, DTYPES[args.dtype], QuantizationConfig(method=args.quantization))
    if adapters:
        from lorakit import PeftModel

        first_name, first_path = adapters[0]
        with damaged_file_errors(first_path):
            model = PeftModel.from_pretrained(model, first_path, adapter_name=first_name)
        for name, path in adapters[1:]:
            with damaged_file_errors(path):
                model.load_adapter(path, adapter_name=name)
        model.set_adapter(first_name)
    model.eval()
    return model, tokenizer, [n for n, _ in adapters]


def _generation_kwargs(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                              "repetition_penalty": args.repetition_penalty,
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id}  # a pad id of 0 is a pad id
    if args.do_sample:
        kwargs.update({name: default if getattr(args, name, None) is None else getattr(args, name)
                       for name, default in SAMPLING_DEFAULTS.items()})
    return kwargs


def _generate(model: Any, tokenizer: Any, input_ids: Any, args: argparse.Namespace, out: TextIO,
              adapter: str | None) -> str:
    """Generate (streaming to `out` unless --no-stream) with `adapter` active, or the bare base if None."""
    import torch
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    streamer = None
    if not args.no_stream:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if hasattr(model, "disable_adapter") and adapter is None:
        ctx = model.disable_adapter()
    else:
        ctx = contextlib.nullcontext()
        if adapter is not None:
            model.set_adapter(adapter)
    with ctx, torch.no_grad():
        ids = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                             **_generation_kwargs(args, tokenizer))
    text = tokenizer.decode(ids[0, input_ids.shape[1]:], skip_special_tokens=True)
    if args.no_stream:
        print(text, file=out)
    return text


def _encode(tokenizer: Any, messages: list[dict[str, str]] | None, prompt: str | None) -> Any:
    if messages is not None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def run_generate(args: argparse.Namespace) -> int:
    check_sampling_flags(args)
    model, tokenizer, names = load_with_adapters(args)
    use_chat = not args.raw and getattr(tokenizer, "chat_template", None)
    for prompt in args.prompt:
        if use_chat:
            ids = _encode(tokenizer, [{"role": "user", "content": prompt}], None)
        else:
            ids = _encode(tokenizer, None, prompt)
        _generate(model, tokenizer, ids, args, sys.stdout, names[0] if names else None)
    return 0


CHAT_HELP = """commands:
  /adapters        list adapters (* = active)
  /adapter NAME    switch to adapter NAME; /adapter none uses the bare base model
  /reset           forget the conversation
  /quit            leave (also Ctrl-D)"""


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """Read user turns from stdin; the conversation is rendered with the tokenizer's chat template."""
    stdin = stdin or sys.stdin
    check_sampling_flags(args)
    model, tokenizer, names = load_with_adapters(args)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{args.base} has no chat template; use `lorakit generate --raw` instead")
    active: str | None = names[0] if names else None
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"[lorakit chat] adapters: {names or 'none'}; active: {active}. /help for commands.")
    while True:
        print(f"[{active or 'base'}] you> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/help":
                print(CHAT_HELP)
            elif cmd == "/reset":
                history = []
            elif cmd == "/adapters":
                print(", ".join(("*" if n == active else "") + n for n in names) or "(no adapters loaded)")
            elif cmd == "/adapter" and (rest.strip() in names or rest.strip() == "none"):
                active = None if rest.strip() == "none" else rest.strip()
                print(f"[lorakit chat] active adapter: {active or 'none (base model)'}")
            else:
                print(f"unknown command or adapter {line!r}; adapters: {names}\n{CHAT_HELP}")
            continue
        history.append({"role": "user", "content": line})
        ids = _encode(tokenizer, system + history, None)
        print("assistant> ", end="", flush=True)
        reply = _generate(model, tokenizer, ids, args, sys.stdout, active)
        history.append({"role": "assistant", "content": reply})
    return 0
