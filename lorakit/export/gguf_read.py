"""Read a GGUF file lazily: metadata and tensor table from the header, each tensor's bytes from a memory map.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): ``GGUF`` magic, version (3), tensor count,
key/value count; key/value pairs (typed); tensor infos ``(name, n_dims, dims fastest-first, ggml type, offset)``;
then the tensor data at the next ``general.alignment`` (default 32) boundary. Unlike ``gguf.GGUFReader``, which
builds a numpy view per metadata item (~160 MB for a 49k-token vocabulary), arrays become plain Python lists.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# GGUF value type -> struct format (0 uint8 ... 12 float64; 7 bool)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]
    """Rows first (torch / numpy order; the file stores dimensions fastest-first)."""
    ggml_type: int
    offset: int
    """From the start of the file."""
    nbytes: int


class GGUFFile:
    """``metadata`` (dict), ``tensors`` (list of :class:`GGUFTensorInfo`) and :meth:`raw` bytes of one tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ValueError(f"{self.path} does not start with the GGUF magic bytes: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path} is GGUF version {version}; versions 2 and 3 are read")
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            self.metadata[key], pos = self._value(pos + 4, vtype)
        raw = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            raw.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
        self.tensors = []
        for name, shape, qtype, offset in raw:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            self.tensors.append(GGUFTensorInfo(name, shape, qtype, start + offset, int(np.prod(shape)) // block * size))

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only ``uint8`` view of the map, shaped ``(rows..., bytes per row)``."""
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], -1)

    def dequantized(self, info: GGUFTensorInfo, chunk: int = 2**20) -> np.ndarray:
        """The tensor as float32 (rows first), dequantized in chunks of rows; its pages of the map are then
        released (``MADV_DONTNEED``), so a streamed file does not stay resident."""
        from gguf.quants import dequantize

        raw = self.raw(info)
        raw = raw.reshape(-1, raw.shape[-1])  # (rows, bytes per row)
        out = np.empty(info.shape, dtype=np.float32)
        rows = out.reshape(-1, info.shape[-1])  # (rows, cols)
        step = max(1, chunk // rows.shape[1])
        for i in range(0, rows.shape[0], step):
            rows[i: i + step] = dequantize(raw[i: i + step], info.ggml_type)
        del raw
        self.release(info)
        return out

    def release(self, info: GGUFTensorInfo) -> None:
        """Drop the map's resident pages of ``info`` (they are re-read from disk if touched again)."""
        advise = getattr(self._map, "madvise", None)
        if advise is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        advise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, pos)
        return self._map[pos + 8: pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

    def _value(self, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, self._map, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", self._map, pos)
            pos += 12
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._map, pos))
                return values, pos + count * struct.calcsize(fmt)
            values = []
            for _ in range(count):
                value, pos = self._value(pos, etype)
                values.append(value)
            return values, pos
        raise ValueError(f"{self.path}: metadata value type {vtype} is not a GGUF type")
