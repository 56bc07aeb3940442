"""rank_matmul: the adapters' rank-r products, on oneDNN where large enough, repeated and measured faster, equal
to torch.mm."""

from __future__ import annotations

import pytest
import torch

from lorakit.kernels import small_matmul
from lorakit.kernels.lora_fused import lora_linear, lora_linear_reference
from lorakit.kernels.small_matmul import ONEDNN_AFTER_CALLS, rank_matmul, rank_matmul_reference

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

M, R, IN, OUT = 256, 16, 512, 640  # 2 M 512 R = 4.2 MFLOP: the smallest products are at the oneDNN threshold


@pytest.fixture
def onednn_calls(monkeypatch):
    """Fresh shape counts, a list that records each call of the oneDNN op, and a timing trial that always finds
    oneDNN faster (without calling it), so that which path a key takes does not depend on this machine."""
    monkeypatch.setattr(small_matmul, "_seen", {})
    monkeypatch.setattr(small_matmul, "_linear_pointwise", None)
    op = small_matmul._onednn_linear()
    calls = []
    if op:
        monkeypatch.setattr(small_matmul, "_linear_pointwise", lambda *a: calls.append(a) or op(*a))
    monkeypatch.setattr(small_matmul, "_onednn_is_faster", lambda *a: True)
    return calls


def _lora_products():
    """The six products of a LoRA linear's step, with the strides the fused autograd passes."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(M, IN, generator=g), torch.randn(M, OUT, generator=g)
    a, b = torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)
    h, grad_h = torch.randn(M, R, generator=g), torch.randn(M, R, generator=g)
    return {
        "x A^T": (x, a.t()), "h B^T": (h, b.t()), "dY B": (dy, b),
        "dA": (grad_h.t(), x), "dB^T": (h.t(), dy), "g A": (grad_h, a),
    }


@needs_onednn
@pytest.mark.parametrize("name", list(_lora_products()))
def test_onednn_path_equals_mm_for_each_lora_product(onednn_calls, name):
    lhs, rhs = _lora_products()[name]
    ref = rank_matmul_reference(lhs, rhs)
    for _ in range(ONEDNN_AFTER_CALLS + 1):  # counted, then decided: computed by the reference
        assert torch.equal(rank_matmul(lhs, rhs), ref)
    assert onednn_calls == []
    out = rank_matmul(lhs, rhs)
    assert len(onednn_calls) == 1, "a repeated large fp32 product must take the oneDNN path"
    assert out.shape == ref.shape and out.is_contiguous()
    # fp32 with another summation order: |error| <= 1e-5 of the largest entry (seen: ~1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@needs_onednn
def test_bias_is_added(onednn_calls):
    lhs, rhs = _lora_products()["h B^T"]
    bias = torch.randn(OUT)
    for _ in range(ONEDNN_AFTER_CALLS + 2):
        out = rank_matmul(lhs, rhs, bias)
    assert len(onednn_calls) == 1
    ref = rank_matmul_reference(lhs, rhs, bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_small_fp64_and_unrepeated_products_stay_on_the_reference(onednn_calls):
    lhs, rhs = _lora_products()["x A^T"]
    small = (lhs[:8], rhs)  # 2 * 8 * 512 * 16 FLOPs: below the threshold
    for _ in range(3 * ONEDNN_AFTER_CALLS):
        rank_matmul(*small)
        rank_matmul(lhs.double(), rhs.double())
    tall = torch.randn(2 * M, IN)
    for rows in range(2 * M - ONEDNN_AFTER_CALLS, 2 * M):  # a new shape each call, as with unpadded batches
        rank_matmul(tall[:rows], rhs)
    assert onednn_calls == []
    assert len(small_matmul._seen) == ONEDNN_AFTER_CALLS  # only the large fp32 shapes are counted


def test_switched_off_and_capped(onednn_calls, monkeypatch):
    lhs, rhs = _lora_products()["x A^T"]
    monkeypatch.setattr(small_matmul, "enabled", False)
    for _ in range(2 * ONEDNN_AFTER_CALLS):
        rank_matmul(lhs, rhs)
    assert onednn_calls == [] and small_matmul._seen == {}
    monkeypatch.setattr(small_matmul, "enabled", True)
    monkeypatch.setattr(small_matmul, "MAX_TRACKED", 0)
    for _ in range(2 * ONEDNN_AFTER_CALLS):
        rank_matmul(lhs, rhs)
    assert onednn_calls == [] and small_matmul._seen == {}


def test_a_refused_layout_falls_back_for_good(monkeypatch):
    monkeypatch.setattr(small_matmul, "_seen", {})
    monkeypatch.setattr(small_matmul, "_onednn_is_faster", lambda *a: True)
    calls = []

    def refuse(*args):
        calls.append(1)
        raise RuntimeError("unsupported layout")

    monkeypatch.setattr(small_matmul, "_linear_pointwise", refuse)
    lhs, rhs = _lora_products()["dA"]
    ref = rank_matmul_reference(lhs, rhs)
    for _ in range(3 * ONEDNN_AFTER_CALLS):
        assert torch.equal(rank_matmul(lhs, rhs), ref)
    assert calls == [1]  # tried once, then the key stays on the reference


@needs_onednn
def test_fused_lora_linear_on_the_onednn_path_matches_autograd(onednn_calls):
    """Values and gradients of the fused linear once its products run on oneDNN, vs plain autograd (fp32)."""
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(OUT, IN, generator=g) / IN**0.5, torch.randn(OUT, generator=g)
    a = (torch.randn(R, IN, generator=g) / IN**0.5).requires_grad_()
    b = (torch.randn(OUT, R, generator=g) / R**0.5).requires_grad_()  # B != 0
    x = torch.randn(2, M // 2, IN, generator=g, requires_grad=True)
    dy = torch.randn(2, M // 2, OUT, generator=g)
    ref = lora_linear_reference(x, w, bias, a, b, 2.0)
    ref_grads = torch.autograd.grad(ref, (x, a, b), dy)
    for _ in range(ONEDNN_AFTER_CALLS + 2):
        out = lora_linear(x, w, bias, a, b, 2.0, training=True)
        grads = torch.autograd.grad(out, (x, a, b), dy)
    assert len(onednn_calls) == 6  # the last step: all six rank-r products on oneDNN
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_traced_by_torch_compile_without_graph_breaks(onednn_calls):
    lhs, rhs = _lora_products()["x A^T"]
    compiled = torch.compile(rank_matmul, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    for _ in range(ONEDNN_AFTER_CALLS + 2):
        out = compiled(lhs, rhs)
    assert onednn_calls == [] and small_matmul._seen == {}  # the plain op, nothing counted while tracing
    torch.testing.assert_close(out, rank_matmul_reference(lhs, rhs))


@needs_onednn
def test_a_key_where_onednn_measures_slower_stays_on_the_reference(onednn_calls, monkeypatch):
    trials = []
    monkeypatch.setattr(small_matmul, "_onednn_is_faster", lambda *a: trials.append(a) or False)
    lhs, rhs = _lora_products()["dB^T"]
    ref = rank_matmul_reference(lhs, rhs)
    for _ in range(3 * ONEDNN_AFTER_CALLS):
        assert torch.equal(rank_matmul(lhs, rhs), ref)
    assert len(trials) == 1 and onednn_calls == []  # timed once, then never tried again


@needs_onednn
def test_the_timing_trial_runs_both_libraries_and_keeps_its_choice(monkeypatch):
    monkeypatch.setattr(small_matmul, "_seen", {})
    lhs, rhs = _lora_products()["x A^T"]
    op = small_matmul._onednn_linear()
    calls = []
    monkeypatch.setattr(small_matmul, "_linear_pointwise", lambda *a: calls.append(a) or op(*a))
    # the real trial: one untimed build call and TRIAL_REPS timed calls of oneDNN
    for _ in range(ONEDNN_AFTER_CALLS + 1):
        rank_matmul(lhs, rhs)
    assert len(calls) == 1 + small_matmul.TRIAL_REPS
    decided = small_matmul._seen[next(iter(small_matmul._seen))]
    assert decided in (small_matmul._ONEDNN, small_matmul._REFERENCE)
    out = rank_matmul(lhs, rhs)
    assert len(calls) == 1 + small_matmul.TRIAL_REPS + (decided == small_matmul._ONEDNN)
    ref = rank_matmul_reference(lhs, rhs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@needs_onednn
def test_deterministic_mode_stays_on_the_reference(onednn_calls):
    lhs, rhs = _lora_products()["x A^T"]
    ref = rank_matmul_reference(lhs, rhs)
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3 * ONEDNN_AFTER_CALLS):
            assert torch.equal(rank_matmul(lhs, rhs), ref)
    finally:
        torch.use_deterministic_algorithms(False)
    assert onednn_calls == []
