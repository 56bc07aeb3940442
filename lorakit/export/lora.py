"""``--format gguf-lora``: a PEFT LoRA adapter as llama.cpp's LoRA-adapter GGUF (``llama-cli --lora FILE``).

Layout of llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha`` (float32), the base model's ``general.architecture``; per adapted weight ``W`` (GGUF
name ``blk.N.attn_q.weight``) two tensors ``blk.N.attn_q.weight.lora_a`` = A (r, in) and ``.lora_b`` = B (out, r),
with B's rows permuted like W's for ``attn_q`` / ``attn_k`` of the ``llama`` architecture (the permutation acts on
output rows, so ``P(B @ A) = (P B) @ A``).

llama.cpp scales each pair by ``alpha / r`` with ``r`` read from the tensors (``llama-adapter.cpp``). Where the
adapter's own scaling differs (rsLoRA's ``alpha / sqrt(r)``, ``alpha_pattern``), B is multiplied by
``scaling / (alpha / r)`` so llama.cpp computes the same ``scaling * B @ A``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit.export.arch import TensorNames
from lorakit.export.source import AdapterMerge
from lorakit.export.writer import FILE_TYPES, OUTTYPES, check_output, ggml_type, report, write_gguf


def export_gguf_lora(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    outtype: str = "f32",
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> Path:
    """Write the LoRA adapter folder ``adapter`` as a llama.cpp LoRA GGUF ``out``; returns its absolute path.

    Args:
        base: the base model (folder with config.json, or .gguf file); only its config is read. Default: the
            adapter's ``base_model_name_or_path`` when that is a local path.
        outtype: type of the A / B tensors (``f32`` default as in llama.cpp's converter; ``f16``, ``bf16``,
            ``q8_0`` where the row length allows, else F16).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not supported; allowed: {', '.join(OUTTYPES)}")
    merge = AdapterMerge(adapter)
    config = _base_config(base, merge)
    names = TensorNames(config)
    path = check_output(out, merge.paths)
    if merge.full:
        raise NotImplementedError(f"the adapter stores whole tensors ({sorted(merge.full)[:3]}: modules_to_save or "
                                  "resized embeddings), which a llama.cpp LoRA GGUF cannot carry: export the merged "
                                  "model with --format gguf instead")
    alpha = float(merge.config.lora_alpha)
    plan, tensors = [], []
    for weight, parts in merge.lora.items():
        if "A" not in parts or "bias" in parts:
            what = "an embedding" if "embA" in parts else "a lora_bias"
            raise NotImplementedError(f"{weight}: {what} LoRA in a llama.cpp LoRA GGUF is not implemented; export "
                                      "the merged model with --format gguf instead")
        gname = names.gguf_name(weight)
        if gname is None:
            raise ValueError(f"the adapter changes {weight}, which llama.cpp does not store separately (a tied "
                             "lm_head): export the merged model with --format gguf instead")
        a, b = parts["A"], parts["B"]  # (r, in), (out, r)
        r = a.shape[0]
        llama_cpp_scaling = alpha / r if alpha else 1.0
        b = names.to_gguf_layout(gname, b * (merge.scaling(weight, r) / llama_cpp_scaling))
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            shape = tuple(t.shape)
            plan.append((gname + suffix, shape, ggml_type(outtype, gname + suffix, shape)))
            tensors.append((gname + suffix, t))
    metadata: dict[str, Any] = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": alpha,
                                "general.name": Path(os.fspath(adapter)).resolve().name,
                                "general.file_type": FILE_TYPES[outtype], "general.quantization_version": 2}
    size = write_gguf(path, names.spec.gguf_arch, metadata, plan, iter(tensors), progress)
    report(path, size, echo)
    return path


def _base_config(base: str | os.PathLike | None, merge: AdapterMerge) -> Any:
    from transformers import AutoConfig

    from lorakit.quant.gguf_in import find_gguf

    where = base if base is not None else merge.config.base_model_name_or_path
    if where is None or not os.path.exists(os.path.expanduser(os.fspath(where))):
        raise FileNotFoundError(f"the base model's config is needed for the tensor names: pass --base (the adapter "
                                f"names {merge.config.base_model_name_or_path!r}, which is not a local path)")
    gguf_file = find_gguf(where)
    if gguf_file is not None:
        return AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    path = Path(os.path.expanduser(os.fspath(where)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base {os.fspath(where)!r} has no config.json and is not a .gguf file")
    return AutoConfig.from_pretrained(path)


def lora_pairs(file: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read a LoRA GGUF back: ``{gguf weight name: (A (r, in), B (out, r))}`` as float32 (for tests and tools)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(os.fspath(file))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        found.setdefault(base, {})[part] = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
    return {k: (v["lora_a"], v["lora_b"]) for k, v in found.items()}
