"""``--format gguf``: a base model (+ a LoRA adapter merged in float32) as one GGUF file llama.cpp runs.

The base streams from its folder (safetensors), a GGUF file (dequantized per tensor) or memory; each tensor is
merged with the adapter (``W + scaling * B @ A``, in float32 before any rounding), moved to llama.cpp's layout,
converted to the outtype and written before the next is read. The tokenizer and chat template go into the
metadata. Pure Python (the gguf package): nothing is compiled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.export.arch import ROPE_FREQS, TensorNames, hparams, rope_freq_factors
from lorakit.export.source import AdapterMerge, ModelSource, open_source
from lorakit.export.tokenizer import tokenizer_metadata
from lorakit.export.writer import FILE_TYPES, OUTTYPES, check_output, ggml_type, report, write_gguf


def export_gguf(
    model: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    outtype: str = "f16",
    tokenizer: Any = None,
    name: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> Path:
    """Write ``model`` (+ ``adapter`` merged) to the GGUF file ``out``; returns its absolute path.

    Args:
        model: a model folder, a ``.gguf`` file (or a folder holding one), or a plain transformers model in
            memory (then ``tokenizer`` is required).
        out: the ``.gguf`` file to write (atomically; never one of the input files).
        adapter: a PEFT LoRA adapter folder to merge (float32 merge before the outtype rounding).
        outtype: ``f32`` | ``f16`` | ``bf16`` | ``q8_0`` | ``q4_0`` for 2-D weights (1-D tensors stay F32).
        name: ``general.name`` (default: the model folder's or file's name).
        progress: show a progress bar (stderr). echo: prints the final line with the file size (None: silent).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not supported; allowed: {', '.join(OUTTYPES)}")
    source = open_source(model, tokenizer)
    merge = AdapterMerge(adapter) if adapter is not None else None
    path = check_output(out, [*source.paths, *(merge.paths if merge else ())])
    metadata, plan, names = model_plan(source, outtype, name or _default_name(model))
    size = write_gguf(path, names.spec.gguf_arch, metadata, plan, _stream(source, names, merge), progress)
    report(path, size, echo)
    return path


def model_plan(source: ModelSource, outtype: str, name: str) -> tuple[dict[str, Any], list, TensorNames]:
    """(metadata, [(gguf name, shape, ggml type)], names) of a full-model file."""
    config = source.config
    names = TensorNames(config)
    if source.tokenizer is None:
        raise ValueError("the model has no tokenizer: a GGUF model file needs one (llama.cpp tokenizes with it)")
    metadata: dict[str, Any] = {"general.type": "model", "general.name": name,
                                "general.file_type": FILE_TYPES[outtype], "general.quantization_version": 2}
    metadata |= hparams(config)
    metadata |= source.tokenizer_metadata or tokenizer_metadata(source.tokenizer, config.vocab_size,
                                                                 source.sentencepiece_file)
    plan = []
    for hf_name, shape in source.shapes.items():
        gname = names.gguf_name(hf_name)
        if gname is not None:
            plan.append((gname, shape, ggml_type(outtype, gname, shape)))
    for gname, tensor in extra_tensors(config).items():  # written after the model's own tensors
        plan.append((gname, tuple(tensor.shape), ggml_type(outtype, gname, tuple(tensor.shape))))
    return metadata, plan, names


def extra_tensors(config: Any) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that are not model parameters: Llama 3.1's ``rope_freqs.weight``."""
    factors = rope_freq_factors(config)
    return {} if factors is None else {ROPE_FREQS: factors}


def _stream(source: ModelSource, names: TensorNames, merge: AdapterMerge | None) -> Iterator[tuple[str, torch.Tensor]]:
    for hf_name, tensor in source.tensors():
        if merge is not None:
            tensor = merge.apply(hf_name, tensor)
        gname = names.gguf_name(hf_name)
        if gname is not None:
            yield gname, names.to_gguf_layout(gname, tensor)
    if merge is not None:
        merge.check_all_used()
    yield from extra_tensors(source.config).items()


def _default_name(model: Any) -> str:
    if isinstance(model, nn.Module):
        return Path(str(getattr(model, "name_or_path", "") or "model")).stem or "model"
    return Path(os.fspath(model)).resolve().stem
