"""`lorakit serve`: argument parsing for the OpenAI-compatible server (lorakit/serve)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _adapter(text: str) -> tuple[str, str]:
    """``NAME=PATH``, or ``PATH`` named after its folder."""
    name, sep, path = text.partition("=")
    if not sep or os.path.exists(text):
        name, path = os.path.basename(text.rstrip("/")), text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, path


def add_parser(sub: Any) -> None:
    """Register the `serve` verb on the subcommand parsers of `lorakit`."""
    p = sub.add_parser("serve", help="OpenAI-compatible server: many adapters on one base, batched together")
    p.add_argument("--base", required=True, help="base model (folder or Hub id)")
    p.add_argument("--adapter", type=_adapter, action="append", default=[], metavar="NAME=PATH",
                   help="an adapter folder served as model NAME (repeat for several)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the base's model name (default: its folder's name)")
    p.add_argument("--max-batch-size", type=_positive_int, default=32, help="requests decoded together at most")
    p.add_argument("--max-queue", type=_positive_int, default=256, help="waiting requests at most (then 429)")
    p.add_argument("--adapter-root", default=None,
                   help="folder whose adapter folders /v1/load_lora_adapter may load (default: runtime loading off)")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="quantize the base on load (nf4: QLoRA's 4-bit base)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        from lorakit.serve.app import ServeConfig, serve
    except ImportError as err:
        raise ImportError(f"lorakit serve needs fastapi and uvicorn ({err}): pip install 'lorakit[serve]'") from err
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise FileNotFoundError(f"--adapter-root {args.adapter_root!r} is not a folder")
    serve(ServeConfig(base=args.base, adapters=args.adapter, host=args.host, port=args.port, api_key=args.api_key,
                      served_model_name=args.served_model_name, max_batch_size=args.max_batch_size,
                      max_queue=args.max_queue, adapter_root=args.adapter_root, quantization=args.quantization,
                      dtype=args.dtype))
    return 0
