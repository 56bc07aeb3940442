"""Triton kernels (SwiGLU, RMSNorm, RoPE) against their pure-PyTorch references.

Not collected by the default run (no ``test_`` prefix): it must start in a fresh process, because
``@triton.jit`` (also inside ``triton.language``) picks compiled or interpreted when triton is first imported,
and transformers imports triton. ``tests/kernels/test_triton_kernels.py`` runs it on CPU with
TRITON_INTERPRET=1; ``tests/gpu/test_kernels_cuda.py`` runs it on CUDA. Direct use:
``TRITON_INTERPRET=1 pytest tests/kernels/triton_cases.py`` (CPU) or ``pytest tests/kernels/triton_cases.py``.
"""

import os

import pytest
import torch

from lorakit.kernels.lora_fused import LoraProjection, lora_mlp, lora_mlp_reference
from lorakit.kernels.rms_norm import rms_norm, rms_norm_reference
from lorakit.kernels.rope import rope, rope_reference
from lorakit.kernels.swiglu import swiglu, swiglu_backward_reference, swiglu_forward_reference

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


# fp32 kernels vs fp32 references: only the order of fp32 operations differs.
F32 = dict(rtol=1e-5, atol=1e-6)
# bf16 outputs: one bf16 rounding (2**-8 relative) may land differently.
BF16 = dict(rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32), (torch.bfloat16, BF16)])
def test_swiglu_kernel_matches_reference(dtype, tol):
    g = torch.randn(3, 5, 70, dtype=dtype, device=DEVICE, requires_grad=True)  # 1050: 2 blocks, ragged tail
    u = torch.randn(3, 5, 70, dtype=dtype, device=DEVICE, requires_grad=True)
    out = swiglu(g, u, backend="triton")
    torch.testing.assert_close(out, swiglu_forward_reference(g, u), **tol)
    dy = torch.randn_like(out)
    for a, b in zip(_grads(out, [g, u], dy), swiglu_backward_reference(dy, g, u), strict=True):
        torch.testing.assert_close(a, b, **tol)
    # The reference backward itself against autograd on the plain formula, in float64.
    g64, u64, dy64 = (t.detach().double().requires_grad_() for t in (g, u, dy))
    plain = torch.nn.functional.silu(g64) * u64
    expected = _grads(plain, [g64, u64], dy64)
    for a, b in zip(swiglu_backward_reference(dy64, g64, u64), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, F32), (torch.bfloat16, BF16)])
def test_rms_norm_kernel_matches_reference(dtype, tol):
    weight = (torch.rand(48, device=DEVICE) + 0.5).to(dtype).requires_grad_()
    x = torch.randn(2, 7, 48, dtype=dtype, device=DEVICE, requires_grad=True)
    ref = rms_norm_reference(x, weight, 1e-5)
    out = rms_norm(x, weight, 1e-5, backend="triton")
    torch.testing.assert_close(out, ref, **tol)
    dy = torch.randn_like(ref)
    grad_tol = tol if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)  # bf16 grads summed over rows
    for a, b in zip(_grads(out, [x, weight], dy), _grads(ref, [x, weight], dy), strict=True):
        torch.testing.assert_close(a, b, **grad_tol)


@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_kernel_matches_reference(cos_batch):
    b, nh, t, hd = 2, 3, 5, 16
    q = torch.randn(b, nh, t, hd, requires_grad=True)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    pos = torch.arange(t).float()[None].expand(cos_batch, t) + torch.arange(cos_batch)[:, None]
    freqs = pos[..., None] * inv  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q, cos, sin = (t.detach().to(DEVICE) for t in (q, cos, sin))
    q.requires_grad_()
    ref = rope_reference(q, cos, sin)
    out = rope(q, cos, sin, backend="triton")
    torch.testing.assert_close(out, ref, **F32)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(_grads(out, [q], dy)[0], _grads(ref, [q], dy)[0], **F32)


def test_lora_mlp_with_triton_swiglu_matches_reference():
    def proj(d_in, d_out):
        a = (torch.randn(4, d_in, device=DEVICE) / d_in**0.5).requires_grad_()
        b = torch.randn(d_out, 4, device=DEVICE).requires_grad_()
        return LoraProjection(torch.randn(d_out, d_in, device=DEVICE) / 4, None, a, b, 0.5)

    gate, up, down = proj(16, 40), proj(16, 40), proj(40, 16)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    out = lora_mlp(x, gate, up, down, backend="triton")
    ref = lora_mlp_reference(x, gate, up, down)
    torch.testing.assert_close(out, ref, **F32)
    params = [x, gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B]
    dy = torch.randn_like(out)
    for a, b in zip(_grads(out, params, dy), _grads(ref, params, dy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
