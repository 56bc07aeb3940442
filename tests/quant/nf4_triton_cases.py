"""Run by test_quant_nf4_triton.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it at jit time),
and by tests/gpu/test_nf4_triton.py on CUDA: the Triton kernel against the reference, bit for bit."""

import sys

import torch

from lorakit.kernels.nf4 import triton_dequantize_4bit
from lorakit.quant.nf4 import _dequantize_4bit_reference, dequantize_absmax, quantize_4bit


def check(device: str) -> int:
    torch.manual_seed(0)
    count = 0
    for shape in [(64, 64), (7, 33), (1, 4099)]:
        for quant_type in ("nf4", "fp4"):
            for blocksize, nested in ((64, True), (128, False), (4096, False)):
                A = (torch.randn(shape) * 3).to(device)
                packed, state = quantize_4bit(A, blocksize, quant_type, nested)
                absmax, n = dequantize_absmax(state), A.numel()
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    ours = triton_dequantize_4bit(packed.reshape(-1), absmax, state.code, blocksize, n, dtype)
                    ref = _dequantize_4bit_reference(packed.reshape(-1), absmax, state.code, blocksize, n, dtype)
                    assert ours is not None and torch.equal(ours, ref), (shape, quant_type, blocksize, dtype)
                    count += 1
    return count


if __name__ == "__main__":
    print(f"{check(sys.argv[1] if len(sys.argv) > 1 else 'cpu')} cases equal")
