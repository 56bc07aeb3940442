"""Write GGUF files with the gguf package: tensor types per ``--outtype``, streaming, atomic.

File layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): header, key/value metadata, tensor
infos (name, shape, type, offset), then the aligned tensor data. All infos are known before any data is
written (names and shapes come from the source's header), so each tensor is converted and written as it is
read, then freed: peak memory is the source's own plus about one converted tensor.

Tensor types, as llama.cpp's ``convert_hf_to_gguf.py`` chooses them: 1-D tensors (norms, biases) stay F32;
2-D weights take the outtype. Q8_0 / Q4_0 blocks hold 32 values of a row (``d = absmax / 127`` resp.
``d = max / -8``), so a row whose length is not a multiple of 32 is written F16 instead; with q4_0 the token
embedding and output matrices are written Q8_0 (llama.cpp's quantizer keeps them at higher precision too).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QK = 32  # values per Q8_0 / Q4_0 block (ggml's QK8_0, QK4_0)


def ggml_type(outtype: str, gguf_name: str, shape: tuple[int, ...]) -> Any:
    """The ggml type a tensor is written in."""
    from gguf import GGMLQuantizationType as T

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not supported; allowed: {', '.join(OUTTYPES)}")
    if len(shape) < 2 or outtype == "f32":
        return T.F32
    if outtype in ("f16", "bf16"):
        return T.F16 if outtype == "f16" else T.BF16
    if shape[-1] % QK != 0:
        return T.F16
    if outtype == "q4_0" and gguf_name.split(".")[0] in ("token_embd", "output"):
        return T.Q8_0
    return T.Q8_0 if outtype == "q8_0" else T.Q4_0


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}
"""``general.file_type``: llama.cpp's ``LlamaFileType`` (ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q8_0, MOSTLY_BF16)."""


def nbytes(qtype: Any, shape: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


CHUNK = 2**20
"""Values quantized per call: the quantizer's float temporaries stay a few MB whatever the tensor's size."""


def convert(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    """A float32 tensor as the bytes / values of ``qtype`` (``gguf.quants`` is the reference quantizer), quantized
    in chunks of rows into one preallocated output."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape, quantize

    arr = tensor.detach().to(torch.float32).contiguous().numpy()
    if qtype == T.F32:
        return arr
    if qtype == T.F16:
        return arr.astype(np.float16)
    rows = arr.reshape(-1, arr.shape[-1])  # (rows, cols)
    out = np.empty(quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)  # (rows, bytes per row)
    step = max(1, CHUNK // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i: i + step] = quantize(rows[i: i + step], qtype)
    return out.reshape(*arr.shape[:-1], out.shape[-1])


def add_metadata(writer: Any, kv: dict[str, Any]) -> None:
    """Add ``kv`` with GGUF types: bool, uint32 for ints, float32 for floats, strings, arrays (int32 / float32 /
    string)."""
    from gguf import GGUFValueType as V

    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list | tuple) and value:
            sub = V.STRING if isinstance(value[0], str) else V.FLOAT32 if isinstance(value[0], float) else V.INT32
            writer.add_key_value(key, list(value), V.ARRAY, sub_type=sub)
        else:
            raise TypeError(f"metadata {key}: cannot write a {type(value).__name__}")


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], suffix: str = ".gguf") -> Path:
    """The output file path; refuses a folder, a wrong suffix, or a path that is one of the input files."""
    path = Path(os.path.expanduser(os.fspath(out))).resolve()
    if path.is_dir():
        raise ValueError(f"--out {os.fspath(out)!r} is a folder; give a file path ending in {suffix}")
    if path.suffix.lower() != suffix:
        raise ValueError(f"--out {os.fspath(out)!r} must end in {suffix}")
    for item in inputs:
        if path.exists() and os.path.samefile(path, item) or path == Path(item).resolve():
            raise ValueError(f"--out {os.fspath(out)!r} is an input file ({os.fspath(item)}); writing there would "
                             "destroy it. Give another path.")
    return path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (``os.replace``), else is deleted,
    so ``path`` is never left half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, Any],
    plan: list[tuple[str, tuple[int, ...], Any]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    progress: bool = True,
) -> int:
    """Write a GGUF file atomically; returns its size in bytes.

    ``plan`` lists ``(gguf name, shape (numpy order: rows first), ggml type)`` in write order; ``tensors`` yields
    ``(gguf name, float32 tensor of that shape)`` in the same order, each converted and written before the next
    is read.
    """
    from gguf import GGUFWriter
    from tqdm import tqdm

    total = sum(nbytes(q, s) for _, s, q in plan)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        add_metadata(writer, metadata)
        for name, shape, qtype in plan:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(qtype, shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress,
                   file=sys.stderr)
        done = 0
        for (name, shape, qtype), (got, tensor) in zip(plan, tensors, strict=True):
            if got != name or tuple(tensor.shape) != shape:
                raise RuntimeError(f"tensor stream out of order: expected {name} {shape}, got {got} "
                                   f"{tuple(tensor.shape)}")
            data = convert(tensor, qtype)
            del tensor
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
            done += 1
            del data
        bar.close()
        writer.close()
        size = tmp.stat().st_size
    return size


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def report(path: Path, size: int, echo: Callable[[str], None] | None) -> None:
    if echo is not None:
        echo(f"[lorakit] wrote {path} ({human_size(size)})")
