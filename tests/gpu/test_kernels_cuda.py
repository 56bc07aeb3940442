"""Opt-in GPU checks (``pytest -m gpu``): the Triton kernel cases compiled for CUDA, and the fused LoRA /
chunked loss paths on CUDA in bf16 against their references."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.kernels.chunked_ce import chunked_lm_loss, lm_loss_reference
from lorakit.kernels.lora_fused import lora_linear, lora_linear_reference
from lorakit.kernels.offload import offload_activations

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_triton_kernel_cases_compiled_on_cuda():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = Path(__file__).parents[1] / "kernels" / "triton_cases.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", str(cases)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "skipped" not in proc.stdout


def test_chunked_loss_bf16_cuda():
    hidden = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32000, 256, device="cuda", dtype=torch.bfloat16) / 16
    labels = torch.randint(0, 32000, (1000,), device="cuda")
    ref = lm_loss_reference(hidden, weight, labels, reduction="mean")
    out = chunked_lm_loss(hidden, weight, labels, reduction="mean", chunk_size=128)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    (g_out,) = torch.autograd.grad(out, hidden)
    torch.testing.assert_close(g_out.float(), g_ref.float(), rtol=2e-2, atol=1e-4)


def test_lora_linear_bf16_cuda():
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) / 32
    a = (torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
    b = (torch.randn(2048, 16, device="cuda", dtype=torch.bfloat16) / 4).requires_grad_()
    out = lora_linear(x, w, None, a, b, 2.0)
    ref = lora_linear_reference(x, w, None, a, b, 2.0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, [x, a, b], dy), torch.autograd.grad(ref, [x, a, b], dy), strict=True):
        torch.testing.assert_close(g.float(), r.float(), rtol=5e-2, atol=5e-2 * r.abs().max().item())


def test_offload_moves_saved_tensors_to_pinned_host_memory():
    lin = torch.nn.Linear(1024, 1024, device="cuda")
    x = torch.randn(2048, 1024, device="cuda", requires_grad=True)
    with offload_activations(min_bytes=1) as stats:
        y = torch.relu(lin(x)).sum()
    assert stats.tensors > 0 and stats.bytes >= x.numel() * 4
    y.backward()
    ref_x = x.detach().clone().requires_grad_()
    torch.relu(lin(ref_x)).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
