"""`lorakit merge`: fold a LoRA adapter into its full-precision base, save sharded safetensors atomically.

The merge is ``W' = W + scaling * B @ A`` on the *full-precision* base weights, also for adapters trained on
a 4-bit (QLoRA) base: re-quantizing after the merge would add a second rounding error, and the merged
full-precision model is what users quantize or serve afterwards (QLoRA, https://arxiv.org/abs/2305.14314).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def merge_to_disk(base: str, adapter: str, out: str | os.PathLike, dtype: str = "float32",
                  max_shard_size: str | int = "2GB") -> Path:
    """Load `base` in `dtype` (never quantized), apply `adapter`, merge, write `out` via a temporary folder.

    The folder holds the merged model (sharded safetensors, config, generation config) and the tokenizer
    (from the adapter folder when it has one, as `lorakit train` saves it there, else from the base). It
    loads with plain `transformers.AutoModelForCausalLM.from_pretrained(out)`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import PeftModel

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not an adapter folder")
    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, DTYPES[dtype]))
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tok_source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tok_source)

    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.parent / f".old-{out.name}"
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(tmp, out)
    return out
