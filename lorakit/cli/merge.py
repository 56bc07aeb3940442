"""`lorakit merge`: fold a LoRA adapter into its full-precision base, save sharded safetensors atomically.

The merge is ``W' = W + scaling * B @ A`` on the *full-precision* base weights, also for adapters trained on
a 4-bit (QLoRA) base: re-quantizing after the merge would add a second rounding error, and the merged
full-precision model is what users quantize or serve afterwards (QLoRA, https://arxiv.org/abs/2305.14314).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lorakit.cli.common import DTYPES, damaged_file_errors

MARKER_FILE = "lorakit_merge.json"
"""Written into every merged folder: marks it as a `lorakit merge` output that a later merge may replace."""


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_folder(out: Path, inputs: dict[str, str], overwrite: bool) -> None:
    """Refuse an --out that would destroy something: a file, the current folder or one of its parents, a
    folder holding an input, or a non-empty folder that is not an earlier merge output (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a folder path")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out):
        raise ValueError(f"--out {out} is the current folder or one of its parents; give a new folder, "
                         "e.g. --out merged")
    for what, value in inputs.items():
        if os.path.exists(value) and _is_within(Path(value).resolve(), out):
            raise ValueError(f"--out {out} holds the {what} {value}; merging there would delete it. "
                             "Give another folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file() and not overwrite:
        raise ValueError(f"--out {out} is a non-empty folder that is not an earlier `lorakit merge` output; "
                         "its content would be replaced. Give a new or empty folder, or pass --overwrite "
                         "to replace it.")


def clean_killed_merge(out: Path) -> None:
    """Undo what a merge into `out` killed midway left: its half-written ``.tmp-<name>`` folder is deleted; an
    ``.old-<name>`` folder (the earlier output moved aside for the swap) is put back when `out` is missing (killed
    between the two renames), else deleted (killed while deleting it)."""
    tmp, old = out.parent / f".tmp-{out.name}", out.parent / f".old-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if old.exists():
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)


def merge_to_disk(base: str, adapter: str, out: str | os.PathLike, dtype: str = "float32",
                  max_shard_size: str | int = "2GB", overwrite: bool = False) -> Path:
    """Load `base` in `dtype` (never quantized; a GGUF file is dequantized), apply `adapter`, merge, write `out`
    via a temporary folder.

    The folder holds the merged model (sharded safetensors, config, generation config), the tokenizer
    (from the adapter folder when it has one, as `lorakit train` saves it there, else from the base) and
    `lorakit_merge.json` (base, adapter, dtype). It loads with plain
    `transformers.AutoModelForCausalLM.from_pretrained(out)`.

    An existing `out` is replaced only when it is empty, an earlier merge output (it has
    `lorakit_merge.json`) or `overwrite` is set; never when it is (or contains) the current folder, the base
    or the adapter. Returns the absolute path of `out`.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit import PeftModel
    from lorakit.quant.gguf_in import find_gguf, load_gguf
    from lorakit.train.evaluate import model_path_errors

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if not Path(adapter).exists():
        raise FileNotFoundError(f"--adapter {adapter!r}: no such folder (resolved to {str(Path(adapter).resolve())!r})")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: not an adapter folder")
    out = Path(out).resolve()
    check_out_folder(out, {"base model": base, "adapter": adapter}, overwrite)
    clean_killed_merge(out)
    gguf_file = find_gguf(base)
    with model_path_errors(base, "base model"):
        if gguf_file is not None:  # dequantized to `dtype`, its tokenizer from the file's metadata
            model, tokenizer = load_gguf(gguf_file, getattr(torch, DTYPES[dtype]))
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, DTYPES[dtype]))
    with damaged_file_errors(adapter):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # the tokenizer: the adapter folder's (lorakit train saves it there), else the base's (a GGUF's: loaded above)
    tok_source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else None if gguf_file else base
    if tok_source is not None:
        with model_path_errors(tok_source, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(tok_source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.parent / f".tmp-{out.name}", out.parent / f".old-{out.name}"
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps({"base": str(base), "adapter": str(adapter), "dtype": dtype},
                                                  indent=2))
        if out.exists():  # swap: the earlier output aside, the new one in, then delete the earlier one
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
