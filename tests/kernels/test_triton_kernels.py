"""Triton kernels vs references under Triton's CPU interpreter, and the references vs transformers.

The kernel checks live in ``triton_cases.py`` and run in a fresh process with TRITON_INTERPRET=1 (see there
why); skipped when triton is not installed.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lorakit.kernels.backend import triton_available, use_triton
from lorakit.kernels.rms_norm import RMSNormWithKernel, rms_norm_reference
from lorakit.kernels.rope import rope, rope_reference


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cases = Path(__file__).with_name("triton_cases.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_rms_norm_reference_and_wrapper_match_llama_rms_norm():
    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    x = torch.randn(2, 7, 48, dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm_reference(x, norm.weight, 1e-5), norm(x), rtol=0, atol=0)
    torch.testing.assert_close(RMSNormWithKernel(norm)(x), norm(x), rtol=0, atol=0)  # CPU: the reference
    with pytest.raises(ValueError, match="RMSNorm"):
        RMSNormWithKernel(torch.nn.Linear(2, 2))


def test_rope_reference_matches_transformers():
    q = torch.randn(2, 3, 5, 16)
    emb = torch.randn(2, 5, 8).repeat(1, 1, 2)
    ref, _ = apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
    torch.testing.assert_close(rope_reference(q, emb.cos(), emb.sin()), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cos and sin"):
        rope(q, emb.cos()[:, :4], emb.sin()[:, :4])


def test_backend_selection(monkeypatch):
    x = torch.zeros(2)
    assert not use_triton(x, "auto")  # CPU tensors take the reference under "auto"
    assert not use_triton(x, "torch")
    with pytest.raises(ValueError, match="backend"):
        use_triton(x, "cuda")
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            use_triton(x, "triton")
