"""`lorakit serve`: argument parsing for the OpenAI-compatible server (lorakit/serve)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lorakit.cli.common import positive_int
from lorakit.cli.generate import parse_adapters


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def add_parser(sub: Any) -> None:
    """Register the `serve` verb on the subcommand parsers of `lorakit`."""
    p = sub.add_parser("serve", help="OpenAI-compatible server: many adapters on one base, batched together")
    p.add_argument("--base", required=True, help="base model (folder or Hub id)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter folder served as model NAME (repeat for several)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", default=None, help="the base's model name (default: its folder's name)")
    p.add_argument("--max-batch-size", type=positive_int, default=32, help="requests decoded together at most")
    p.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests at most (then 429)")
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
    adapters = parse_adapters(args.adapter)
    serve(ServeConfig(base=args.base, adapters=adapters, host=args.host, port=args.port, api_key=args.api_key,
                      served_model_name=args.served_model_name, max_batch_size=args.max_batch_size,
                      max_queue=args.max_queue, adapter_root=args.adapter_root, quantization=args.quantization,
                      dtype=args.dtype))
    return 0
