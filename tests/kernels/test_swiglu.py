"""The torch SwiGLU paths (``lorakit.kernels.swiglu``) against the formula reference."""

from __future__ import annotations

import pytest
import torch

from lorakit.kernels.swiglu import (
    swiglu,
    swiglu_backward,
    swiglu_backward_,
    swiglu_backward_reference,
    swiglu_forward,
    swiglu_forward_reference,
)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_native_ops_match_reference(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    g, u, da = (torch.randn(37, 129, generator=gen, dtype=dtype) * 4 for _ in range(3))
    torch.testing.assert_close(swiglu_forward(g, u, "torch"), swiglu_forward_reference(g, u), atol=tol, rtol=tol)
    for got, want in zip(swiglu_backward(da, g, u, "torch"), swiglu_backward_reference(da, g, u), strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_backward_leaves_its_inputs_alone() -> None:
    g, u, da = (torch.randn(8, 16) for _ in range(3))
    before = [t.clone() for t in (g, u, da)]
    swiglu_backward(da, g, u, "torch")
    for t, b in zip((g, u, da), before, strict=True):
        assert torch.equal(t, b)


def test_in_place_backward_writes_dg_into_its_input() -> None:
    g, u, da = (torch.randn(8, 16, dtype=torch.float64) for _ in range(3))
    da_u = da * u
    dg, _ = swiglu_backward_(da_u, g, da * torch.nn.functional.silu(g))
    assert dg.data_ptr() == da_u.data_ptr()
    torch.testing.assert_close(dg, swiglu_backward_reference(da, g, u)[0])


def test_half_precision_keeps_the_fp32_reference() -> None:
    g, u, da = (torch.randn(8, 16).to(torch.bfloat16) for _ in range(3))
    assert torch.equal(swiglu_forward(g, u, "torch"), swiglu_forward_reference(g, u))
    for got, want in zip(swiglu_backward(da, g, u, "torch"), swiglu_backward_reference(da, g, u), strict=True):
        assert torch.equal(got, want)


def test_autograd_op_matches_torch_autograd() -> None:
    g = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 11, dtype=torch.float64)
    grads = torch.autograd.grad(swiglu(g, u, "torch"), (g, u), dy)
    want = torch.autograd.grad(torch.nn.functional.silu(g) * u, (g, u), dy)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)
