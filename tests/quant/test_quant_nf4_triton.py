"""The Triton NF4/FP4 dequant kernel vs the reference under Triton's CPU interpreter (no GPU needed).

Runs nf4_triton_cases.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it when the kernel is
jitted); skipped when triton is not installed. The same cases run on CUDA in tests/gpu/test_nf4_triton.py.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_dequant_matches_reference_under_interpreter():
    cases = Path(__file__).with_name("nf4_triton_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(cases), "cpu"], env=env, capture_output=True, text=True, cwd=Path(__file__).parents[2]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "54 cases equal" in proc.stdout
