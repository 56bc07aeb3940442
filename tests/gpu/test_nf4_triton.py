"""The Triton NF4/FP4 dequant kernel on CUDA, bit for bit against the reference (opt-in: pytest -m gpu)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]


def _cases():
    path = Path(__file__).parents[1] / "quant" / "nf4_triton_cases.py"
    spec = importlib.util.spec_from_file_location("nf4_triton_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_matches_reference_on_cuda():
    assert _cases().check("cuda") == 54


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_4bit_on_cuda_equals_cpu(dtype):
    A = torch.randn(512, 1024, dtype=dtype)
    packed, state = quantize_4bit(A, compress_statistics=True)  # CPU reference
    packed_gpu, state_gpu = quantize_4bit(A.cuda(), compress_statistics=True)  # reference ops on CUDA
    assert torch.equal(packed_gpu.cpu(), packed)
    assert torch.equal(dequantize_4bit(packed_gpu, state_gpu).cpu(), dequantize_4bit(packed, state))
