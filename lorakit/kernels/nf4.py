"""Triton NF4 / FP4 dequantization; reference: ``lorakit.quant.nf4._dequantize_4bit_reference``.

For element ``i`` of the flat weight (first element of a byte in its high nibble)::

    q      = (packed[i // 2] >> 4) if i % 2 == 0 else (packed[i // 2] & 15)
    out[i] = dtype(code[q] * absmax[i // blocksize])        # fp32 product, one round-to-nearest-even cast

The same fp32 product and one cast as the reference, so the two agree bit for bit. One program handles
``BLOCK`` consecutive elements; the work is memory-bound (n / 2 bytes in, n * itemsize bytes out).
Triton is imported on first use; :func:`triton_dequantize_4bit` returns None when it is not installed, and
callers fall back to the reference. Under ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_BLOCK = 1024  # elements per program: 512 bytes read, 2-4 KiB written


@functools.cache
def _kernel() -> Any:
    """The compiled-on-demand kernel, or None without triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequant_4bit_kernel(
        packed_ptr, absmax_ptr, code_ptr, out_ptr, n,
        BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) element indices
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        q = tl.where(offs % 2 == 0, byte >> 4, byte & 15)  # (BLOCK,) 4-bit codes
        value = tl.load(code_ptr + q, mask=mask, other=0.0)  # fp32 code book lookup
        scale = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)  # fp32 block scale
        prod = value * scale  # fp32
        if OUT_BF16:  # round-to-nearest-even on the bits (Triton's interpreter truncates a plain .to(bf16))
            bits = prod.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = prod.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, out, mask=mask)

    return dequant_4bit_kernel


def triton_dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Dequantize ``n`` elements from uint8 ``packed`` ``(ceil(n / 2),)`` with fp32 ``absmax`` and ``code``.

    Returns ``(n,)`` in ``dtype``, or None when triton is unavailable.
    """
    kernel = _kernel()
    if kernel is None:
        return None
    out = torch.empty(n, dtype=dtype, device=packed.device)
    grid = (-(-n // _BLOCK),)
    kernel[grid](
        packed.contiguous(), absmax.float().contiguous(), code.float().contiguous(), out, n,
        BLOCKSIZE=blocksize, BLOCK=_BLOCK, OUT_BF16=dtype == torch.bfloat16,
    )  # fmt: skip
    return out
