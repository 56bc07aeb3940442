"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, bit-compatible with bitsandbytes.

Pure-PyTorch reference (CPU and CUDA). QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314.

A weight ``A`` with ``n`` elements is flattened row-major and cut into blocks of ``blocksize`` consecutive
elements (the last block may be partial). Per block ``b``::

    absmax[b] = max_i |a_i|
    q_i       = argmin_k |code[k] - clamp(a_i * (1 / absmax[b]), -1, 1)|      (ties -> the lower code)
    a_i      ~= code[q_i] * absmax[b]

Two 4-bit codes are packed per byte, the first element in the high nibble. With double quantization
(``compress_statistics=True``) the fp32 ``absmax`` vector is itself quantized to 8 bits::

    offset      = mean(absmax)
    absmax8, s2 = blockwise_8bit(absmax - offset, code=dynamic_map, blocksize=256)
    absmax     ~= dynamic_map[absmax8] * s2[b // 256] + offset

which cuts the statistics from 32 / blocksize = 0.5 to 8 / 64 + 32 / (64 * 256) ~= 0.127 bits per parameter.

Rounding rule for the nested 8-bit codes: exact nearest on the fp32 midpoints of the sorted dynamic map,
ties to the lower code. This matches bitsandbytes' CUDA kernel and its pure-torch path; bitsandbytes' CPU
C++ kernel rounds through a 65536-entry lookup table and picks the neighbouring code on ~0.1-0.2% of the
nested codes (tests/quant/test_quant_nf4.py measures it). The 4-bit codes, ``absmax`` of the 8-bit stage and
``offset`` are bit-exact with every bitsandbytes backend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from lorakit.quant import nf4_cpu

ALLOWED_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for the double-quantized statistics
_STEP = 32768  # elements per 8-bit dequantization step on CPU: at::internal::GRAIN_SIZE (see lorakit.quant.nf4_cpu)
_QUANT_STEP = 2**20  # elements per step of quantize_4bit on CPU (a multiple of every blocksize)

# NF4: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA paper, appendix E).
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by its max (12).
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 code book of ``quant_type`` ("nf4" or "fp4"), indexed by the 4-bit code."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    fp4 = torch.tensor(_FP4, dtype=torch.float32, device=device)
    return fp4 / fp4.abs().max()


def create_dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (max_exponent_bits=7): 256 sorted fp32 values in [-1, 1].

    For exponent ``i`` in 0..6 the fraction grid is the midpoints of ``linspace(0.1, 1, 2**i + 1)`` scaled by
    ``10**(i - 6)``, with both signs; then 0 and 1.0 (Dettmers 2015, https://arxiv.org/abs/1511.04561).
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(data, dtype=torch.float32).sort().values.to(device)


@dataclass
class NestedState:
    """Statistics of the 8-bit stage of double quantization (bitsandbytes' ``QuantState.state2``)."""

    absmax: torch.Tensor  # fp32 [ceil(nblocks / 256)]
    code: torch.Tensor  # fp32 [256], the dynamic map
    blocksize: int = NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor; attribute names follow bitsandbytes'.

    ``absmax`` is fp32 ``[nblocks]``, or uint8 codes with ``offset`` and ``state2`` under double quantization.
    """

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor  # fp32 [16]
    blocksize: int
    quant_type: str
    dtype: torch.dtype  # dtype of the original tensor, and of dequantize_4bit's output
    offset: torch.Tensor | None = None  # fp32 scalar, double quantization only
    state2: NestedState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor of the state to ``device`` in place; returns self."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.state2 is not None and self.offset is not None:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def as_dict(self, packed: bool = True) -> dict[str, object]:
        """The state as bitsandbytes serializes it (keys relative to ``<module>.weight.``).

        packed=True gives tensors only: ``absmax``, ``quant_map``, [``nested_absmax``, ``nested_quant_map``]
        and ``quant_state.bitsandbytes__<type>`` (UTF-8 JSON of the non-tensor fields, as a uint8 tensor).
        """
        meta: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        tensors: dict[str, torch.Tensor] = {"absmax": self.absmax, "quant_map": self.code}
        if self.state2 is not None:
            assert self.offset is not None
            tensors["nested_absmax"] = self.state2.absmax
            tensors["nested_quant_map"] = self.state2.code.clone()
            meta.update(
                nested_blocksize=self.state2.blocksize,
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=self.offset.item(),
            )
        if not packed:
            return {**meta, **tensors}
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return {**tensors, f"quant_state.bitsandbytes__{self.quant_type}": blob}

    @classmethod
    def from_dict(cls, qs_dict: dict[str, object], device: torch.device | str | None = None) -> QuantState:
        """Inverse of :meth:`as_dict`; keys may carry a prefix (``model.q_proj.weight.absmax``)."""
        flat: dict[str, object] = {}
        for key, value in qs_dict.items():
            if ".quant_state.bitsandbytes__" in f".{key}":
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{key!r} must be a uint8 tensor of UTF-8 JSON, got {type(value).__name__}")
                flat.update(json.loads(bytes(value.cpu().tolist()).decode("utf-8")))
            else:
                flat[key.split(".")[-1]] = value
        missing = {"absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"} - flat.keys()
        if missing:
            raise ValueError(f"quant state is missing {sorted(missing)}; got keys {sorted(qs_dict)}")
        state2 = offset = None
        if "nested_absmax" in flat:
            state2 = NestedState(
                absmax=_tensor(flat["nested_absmax"]).to(device),
                code=_tensor(flat["nested_quant_map"]).to(device),
                blocksize=int(flat["nested_blocksize"]),  # type: ignore[arg-type]
                dtype=_dtype_from_name(str(flat["nested_dtype"])),
            )
            offset = torch.tensor(float(flat["nested_offset"]), device=device)  # type: ignore[arg-type]
        state = cls(
            absmax=_tensor(flat["absmax"]).to(device),
            shape=torch.Size(flat["shape"]),  # type: ignore[arg-type]
            code=_tensor(flat["quant_map"]).to(device),
            blocksize=int(flat["blocksize"]),  # type: ignore[arg-type]
            quant_type=str(flat["quant_type"]),
            dtype=_dtype_from_name(str(flat["dtype"])),
            offset=offset,
            state2=state2,
        )
        _check_state(state)
        return state


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` blockwise to 4 bits (see the module docstring for the formula).

    Args:
        A: float32 / bfloat16 / float16 tensor of any shape, ``n`` elements.
        blocksize: elements per absmax block, one of ``ALLOWED_BLOCKSIZES``.
        quant_type: "nf4" (default here; bitsandbytes defaults to "fp4") or "fp4".
        compress_statistics: double quantization of ``absmax`` (8-bit, blocksize 256).
        quant_storage: dtype the packed bytes are viewed as (uint8, or e.g. bfloat16 for FSDP).

    Returns:
        ``packed`` of shape ``(ceil(n / 2) / itemsize, 1)`` and its :class:`QuantState`.

    On CPU the flat tensor goes in steps of ``_QUANT_STEP`` elements (whole blocks; blocks are independent, so
    the result is the same), which bounds the fp32 / int32 temporaries to one step while loading a model.
    """
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")
    _check_quant_type(quant_type)
    if A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_4bit input dtype must be one of {FLOAT_DTYPES}, got {A.dtype}")
    code = get_4bit_code(quant_type, A.device)
    order = torch.argsort(code, stable=True)  # identity for nf4; fp4's code book is in bit-pattern order
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # (15,)
    flat = A.detach().reshape(-1)  # (n,)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=A.device)  # (nblocks,)
    step = max(1, n) if _simple_path(flat) else _QUANT_STEP
    for start in range(0, n, step):  # whole blocks per step: fp32 temporaries of one step, not of all of A
        part_absmax, scaled = _absmax_and_scale(flat[start : start + step].float(), blocksize, clamp_full_blocks=True)
        absmax[start // blocksize : start // blocksize + part_absmax.numel()] = part_absmax
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad with 0.0 -> code 7 (nf4) / 0 (fp4)
        q = torch.bucketize(scaled, midpoints, out_int32=True, right=False)  # (k,) ties take the lower code
        if quant_type != "nf4":
            q = order[q]
        q8 = q.to(torch.uint8)
        dst = packed[start // 2 : start // 2 + q8.numel() // 2]  # first element in the high nibble
        torch.bitwise_or(q8[0::2] << 4, q8[1::2], out=dst)
    packed = packed.unsqueeze(1)  # (ceil(n / 2), 1)
    packed = _view_storage(packed, quant_storage)
    if not compress_statistics:
        return packed, QuantState(absmax, A.shape, code, blocksize, quant_type, A.dtype)
    offset = absmax.mean()
    qabsmax, absmax2, dyn = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    state2 = NestedState(absmax=absmax2, code=dyn)
    return packed, QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset, state2)


def zeros_4bit(
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, QuantState]:
    """The packed form of an all-zero tensor, built without quantizing (cheap; works on the meta device).

    Without double quantization it equals ``quantize_4bit(torch.zeros(shape, dtype=dtype), ...)``.
    """
    _check_quant_type(quant_type)
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    zero = 7 if quant_type == "nf4" else 0  # the code of 0.0
    packed = torch.full(((n + 1) // 2, 1), (zero << 4) | zero, dtype=torch.uint8, device=device)
    packed = _view_storage(packed, quant_storage)
    code = get_4bit_code(quant_type, device)
    if not compress_statistics:
        absmax = torch.zeros(nblocks, device=device)
        return packed, QuantState(absmax, torch.Size(shape), code, blocksize, quant_type, dtype)
    codes = torch.full((nblocks,), 127, dtype=torch.uint8, device=device)  # dynamic map [127] == 0
    state2 = NestedState(torch.zeros(-(-nblocks // NESTED_BLOCKSIZE), device=device), create_dynamic_map(device))
    offset = torch.zeros((), device=device)
    return packed, QuantState(codes, torch.Size(shape), code, blocksize, quant_type, dtype, offset, state2)


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``code[q_i] * absmax[i // blocksize]`` in fp32, cast to ``quant_state.dtype``, in ``quant_state.shape``.

    ``dtype`` overrides the output dtype (one rounding from fp32, as bitsandbytes' matmul does for the compute
    dtype). Uses the Triton kernel (``lorakit.kernels.nf4``) on CUDA when triton is installed, the threaded CPU
    backend (``lorakit.quant.nf4_cpu``) on CPU, else the whole-tensor formula (``_dequantize_4bit_reference``).
    Also accepts a bitsandbytes ``QuantState`` (same attribute names).
    """
    dtype = quant_state.dtype if dtype is None else dtype
    _check_state(quant_state)
    n = math.prod(quant_state.shape)
    data = packed if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)
    data = data.reshape(-1)  # (ceil(n / 2),)
    if data.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed tensor holds {data.numel()} bytes but quant_state.shape {tuple(quant_state.shape)} "
            f"needs {(n + 1) // 2}"
        )
    absmax = dequantize_absmax(quant_state)
    if data.is_cuda:
        from lorakit.kernels.nf4 import triton_dequantize_4bit

        out = triton_dequantize_4bit(data, absmax, quant_state.code, quant_state.blocksize, n, dtype)
        if out is not None:
            return out.reshape(quant_state.shape)
    if _simple_path(data):
        out = _dequantize_4bit_reference(data, absmax, quant_state.code, quant_state.blocksize, n, dtype)
    else:
        out = nf4_cpu.dequantize_4bit_cpu(data, absmax, quant_state.code, quant_state.blocksize, n, dtype)
    return out.reshape(quant_state.shape)


def dequantize_absmax(quant_state: QuantState) -> torch.Tensor:
    """The fp32 per-block scales; under double quantization ``dyn[q] * absmax2[b // 256] + offset``."""
    if quant_state.state2 is None:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    absmax = dequantize_blockwise_8bit(quant_state.absmax, s2.absmax, s2.code, s2.blocksize)
    for part in absmax.split(absmax.numel() if _simple_path(absmax) else _STEP):
        part.add_(quant_state.offset)  # in steps, like dequantize_blockwise_8bit
    return absmax


def quantize_blockwise_8bit(
    A: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization to ``code`` (default: the dynamic map), exact nearest, ties low.

    Returns uint8 codes ``(n,)``, fp32 ``absmax`` ``[ceil(n / blocksize)]`` and the code book.
    """
    code = create_dynamic_map(A.device) if code is None else code
    flat = A.reshape(-1).float()
    absmax, scaled = _absmax_and_scale(flat, blocksize, clamp_full_blocks=False)
    midpoints = (code[:-1] + code[1:]) / 2  # (255,), code is sorted
    q = torch.bucketize(scaled, midpoints, right=False).to(torch.uint8)
    return q, absmax, code


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """``code[q_i] * absmax[i // blocksize]`` in fp32, shape ``(n,)``.

    On CPU in steps of whole blocks of about ``_STEP`` elements, so that no op opens an OpenMP region (see
    :func:`_dequantize_4bit_reference`).
    """
    q, code, absmax = q.reshape(-1), code.float(), absmax.float()
    n = q.numel()
    values = torch.empty(n, dtype=torch.float32, device=q.device)
    step = n if _simple_path(q) else max(1, _STEP // blocksize) * blocksize
    for start in range(0, n, step):
        part = values[start : start + step]  # (k,), starts on a block boundary
        torch.index_select(code, 0, q[start : start + step].int(), out=part)
        first, full = start // blocksize, part.numel() // blocksize
        part[: full * blocksize].view(full, blocksize).mul_(absmax[first : first + full, None])
        if full * blocksize < part.numel():  # the partial last block
            part[full * blocksize :].mul_(absmax[first + full])
    return values


def _dequantize_4bit_reference(
    data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """The formula, whole-tensor ops (off the CPU without triton, and under torch.compile); returns ``(n,)``::

        out[i] = dtype(code[q_i] * absmax[i // blocksize])      (fp32 product, one rounding)
        q_2k = byte[k] >> 4,   q_2k+1 = byte[k] & 15

    The CPU backend (``lorakit.quant.nf4_cpu``) and the Triton kernel (``lorakit.kernels.nf4``) compute the same
    bits in steps / tiles.
    """
    q = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n]  # (n,) 4-bit codes, high nibble first
    values = code.float().index_select(0, q.int())  # (n,) fp32
    scale = absmax.float().repeat_interleave(blocksize)[:n]  # (n,)
    return (values * scale).to(dtype)


def _simple_path(t: torch.Tensor) -> bool:
    """Whole-tensor ops, no steps: off the CPU (e.g. CUDA without triton) and under torch.compile."""
    return t.device.type != "cpu" or torch.compiler.is_compiling()


def _absmax_and_scale(flat: torch.Tensor, blocksize: int, clamp_full_blocks: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax ``[nblocks]`` and ``clamp(a / absmax, -1, 1)`` ``(n,)`` with bitsandbytes' CPU quirks.

    Full blocks multiply by the reciprocal; a partial last block divides and stores absmax clamped to 1e-38
    (avoids 0/0); an all-zero full block stores 0.0.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (nblocks_full, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_zeros(0)
    denom = absmax.clamp(min=1e-38) if clamp_full_blocks else absmax
    scaled = torch.clamp(blocks * (1.0 / denom[:, None]), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        am = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(tail / am, -1, 1)])
    return absmax, scaled


def _view_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    if quant_storage == torch.uint8:
        return packed
    itemsize = torch.empty(0, dtype=quant_storage).element_size()
    if packed.numel() % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed byte count ({packed.numel()}) to be a multiple of "
            f"{itemsize}; use quant_storage=torch.uint8 or a tensor with numel divisible by {2 * itemsize}"
        )
    return packed.reshape(-1).view(quant_storage).unsqueeze(1)


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_state(state: QuantState) -> None:
    if state.blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {ALLOWED_BLOCKSIZES}, got {state.blocksize!r}")
    _check_quant_type(state.quant_type)
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be one of {FLOAT_DTYPES}, got {state.dtype}")
    if tuple(state.code.shape) != (16,):
        raise ValueError(f"quant_state.code must have shape (16,), got {tuple(state.code.shape)}")
    nblocks = -(-math.prod(state.shape) // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise ValueError(
            f"quant_state.absmax has {state.absmax.numel()} entries but shape {tuple(state.shape)} with "
            f"blocksize {state.blocksize} needs {nblocks}"
        )
    if state.nested and state.offset is None:
        raise ValueError("quant_state has state2 (double quantization) but offset is None")


def _tensor(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"expected a tensor in the quant state, got {type(value).__name__}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in quant state; expected e.g. 'float32', 'bfloat16'")
    return dtype
