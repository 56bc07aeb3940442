"""The CPU paths of lorakit.quant.nf4 and its backend nf4_cpu that work in steps equal the one-step path and the
formula, bit for bit.

quantize_4bit goes in steps of ``_QUANT_STEP`` elements, dequantize_blockwise_8bit in steps of about ``_STEP``,
dequantize_4bit (lorakit.quant.nf4_cpu) in steps of ``_STEP`` or ``_WORKER_STEP`` on the calling thread or on
worker threads; the steps are shrunk here so that small tensors cross many step boundaries, with a shorter last
step, a partial last block and an odd element count. The one-step path (``_simple_path``, used off the CPU and
under torch.compile) is the comparison. No tolerances: everything is compared with torch.equal on the raw bits.
"""

import os
import threading

import pytest
import torch

from lorakit.quant import nf4, nf4_cpu
from lorakit.quant.nf4 import ALLOWED_BLOCKSIZES, dequantize_4bit, dequantize_absmax, quantize_4bit

SHAPES = [(37, 320), (5, 1001), (4096,), (3, 7)]  # many steps; partial blocks + odd n; one step; < one block


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _formula(packed: torch.Tensor, state: nf4.QuantState, dtype: torch.dtype) -> torch.Tensor:
    """``dtype(code[q_i] * absmax[i // blocksize])``: the docstring's formula, unpacked one nibble at a time."""
    n = state.shape.numel()
    data = _bits(packed)
    q = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:n].long()
    scale = dequantize_absmax(state).repeat_interleave(state.blocksize)[:n]
    return (state.code[q] * scale).to(dtype).reshape(state.shape)


def _one_step(monkeypatch, fn, *args):
    """``fn(*args)`` on the one-step path."""
    with monkeypatch.context() as m:
        m.setattr(nf4, "_simple_path", lambda t: True)
        return fn(*args)


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_steps_equal_one_step(monkeypatch, shape, quant_type, compress_statistics):
    torch.manual_seed(0)
    A = (torch.randn(shape) * torch.rand(shape[-1]) * 3).to(torch.bfloat16)
    monkeypatch.setattr(nf4, "_STEP", 256)
    monkeypatch.setattr(nf4_cpu, "_STEP", 256)
    monkeypatch.setattr(nf4, "_QUANT_STEP", 4096)  # a multiple of every blocksize, as the real one
    for blocksize in (32, 64, 256):
        packed, state = quantize_4bit(A, blocksize, quant_type, compress_statistics)
        ref_packed, ref_state = _one_step(monkeypatch, quantize_4bit, A, blocksize, quant_type, compress_statistics)
        assert torch.equal(_bits(packed), _bits(ref_packed))
        assert torch.equal(state.absmax, ref_state.absmax)
        assert torch.equal(dequantize_absmax(state), _one_step(monkeypatch, dequantize_absmax, state))
        for dtype in nf4.FLOAT_DTYPES:
            out = dequantize_4bit(packed, state, dtype)
            assert out.dtype == dtype and out.shape == A.shape
            assert torch.equal(_bits(out), _bits(_one_step(monkeypatch, dequantize_4bit, packed, state, dtype)))
            assert torch.equal(_bits(out), _bits(_formula(packed, state, dtype)))


@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_default_steps_every_blocksize(blocksize):
    """The real step sizes: 2**15 + 3 * 2**13 + 5 elements -> several steps, a shorter last one, a partial block."""
    torch.manual_seed(1)
    A = torch.randn(2**15 + 3 * 2**13 + 5)
    packed, state = quantize_4bit(A, blocksize, compress_statistics=True)
    for dtype in nf4.FLOAT_DTYPES:
        assert torch.equal(_bits(dequantize_4bit(packed, state, dtype)), _bits(_formula(packed, state, dtype)))


def test_large_output_with_huge_page_advice():
    """A 4096 x 1024 fp32 output (16 MiB) gets the huge-page advice; the values are those of the formula."""
    torch.manual_seed(2)
    packed, state = quantize_4bit(torch.randn(4096, 1024, dtype=torch.bfloat16))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_bits(dequantize_4bit(packed, state, dtype)), _bits(_formula(packed, state, dtype)))


def test_inference_mode_and_autograd_inputs():
    """The steps write into a preallocated output: fine under inference_mode and with grad mode on."""
    packed, state = quantize_4bit(torch.randn(64, 1024))
    expected = _formula(packed, state, torch.float32)
    with torch.inference_mode():
        assert torch.equal(dequantize_4bit(packed, state), expected)
    with torch.enable_grad():
        out = dequantize_4bit(packed, state)
    assert not out.requires_grad and torch.equal(out, expected)


@pytest.fixture
def threads():
    """Sets the calling thread's intra-op thread count for one test, restored afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# (intra-op threads of the caller, patches): the three CPU paths of dequantize_4bit, with 256-element steps
PATHS = {
    "steps": (2, {"_STEP": 256, "_PARALLEL_MIN": 2**62}),
    "inline": (1, {"_WORKER_STEP": 256}),
    "workers": (2, {"_WORKER_STEP": 256, "_PARALLEL_MIN": 1, "_cpu_workers": lambda threads: 2}),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_cpu_path_equals_the_formula(monkeypatch, threads, path, shape, quant_type):
    """Two workers even on a 1-core machine; 256-element steps: many steps handed out, a shorter last one."""
    torch.manual_seed(3)
    A = (torch.randn(shape) * torch.rand(shape[-1]) * 3).to(torch.bfloat16)
    count, patches = PATHS[path]
    for blocksize in (32, 64, 256):
        packed, state = quantize_4bit(A, blocksize, quant_type, compress_statistics=True)
        expected = {dtype: _formula(packed, state, dtype) for dtype in nf4.FLOAT_DTYPES}
        with monkeypatch.context() as m:
            for name, value in patches.items():
                m.setattr(nf4_cpu, name, value)
            threads(count)
            for dtype in nf4.FLOAT_DTYPES:
                assert torch.equal(_bits(dequantize_4bit(packed, state, dtype)), _bits(expected[dtype]))
            assert torch.get_num_threads() == count  # the workers' one intra-op thread is theirs alone


def test_workers_run_ops_inline_and_under_inference_mode(monkeypatch, threads):
    """Worker threads keep one intra-op thread; the caller's count is untouched; an inference-tensor output works."""
    threads(2)
    monkeypatch.setattr(nf4_cpu, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(nf4_cpu, "_WORKER_STEP", 4096)
    monkeypatch.setattr(nf4_cpu, "_cpu_workers", lambda threads: 2)
    packed, state = quantize_4bit(torch.randn(64, 1024))
    expected = _formula(packed, state, torch.float32)
    with torch.inference_mode():
        assert torch.equal(dequantize_4bit(packed, state), expected)
    assert torch.equal(dequantize_4bit(packed, state), expected)
    pool = nf4_cpu._POOL[1]
    assert [f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(8)]] == [1] * 8
    assert torch.get_num_threads() == 2


def test_no_workers_without_openmp(monkeypatch, threads):
    """Another parallel backend shares one thread count: the calling thread does the work, in steps of _STEP."""
    threads(2)
    nf4_cpu._openmp.cache_clear()
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: native thread pool")
    assert nf4_cpu._cpu_workers(2) == 0
    monkeypatch.setattr(nf4_cpu, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(nf4_cpu, "_in_workers", None)  # not called
    packed, state = quantize_4bit(torch.randn(8, 1024))
    assert torch.equal(dequantize_4bit(packed, state), _formula(packed, state, torch.float32))
    monkeypatch.undo()
    nf4_cpu._openmp.cache_clear()


def test_worker_exceptions_reach_the_caller(monkeypatch, threads):
    """A worker's exception is raised to the caller, and the process-wide default the workers' one intra-op
    thread changed is set back to the caller's count: a thread started afterwards sees it, on every call."""
    threads(2)
    monkeypatch.setattr(nf4_cpu, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(nf4_cpu, "_cpu_workers", lambda threads: 2)
    monkeypatch.setattr(nf4_cpu, "_POOL", None)  # fresh workers, whose first step sets them to one thread

    def fail(*args):
        raise RuntimeError("step failed")

    def fresh_thread_count() -> int:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    monkeypatch.setattr(nf4_cpu, "_dequantize_steps", fail)
    packed, state = quantize_4bit(torch.randn(8, 1024))
    try:
        for _ in range(2):  # the second call finds its workers already at one thread
            with pytest.raises(RuntimeError, match="step failed"):
                dequantize_4bit(packed, state)
            assert torch.get_num_threads() == 2
            assert fresh_thread_count() == 2
    finally:
        nf4_cpu._POOL[-1].shutdown()


def test_a_replaced_pool_is_shut_down(monkeypatch, threads):
    """A call wanting more workers than the pool has gets a new pool; the old one is shut down, not leaked."""
    threads(3)
    monkeypatch.setattr(nf4_cpu, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(nf4_cpu, "_POOL", None)
    packed, state = quantize_4bit(torch.randn(8, 1024))
    expected = _formula(packed, state, torch.float32)
    pools = []
    for workers in (2, 3):
        monkeypatch.setattr(nf4_cpu, "_cpu_workers", lambda threads, workers=workers: workers)
        assert torch.equal(dequantize_4bit(packed, state), expected)
        pools.append(nf4_cpu._POOL[-1])
    assert pools[0] is not pools[1]
    assert pools[0]._shutdown and not pools[1]._shutdown
    pools[1].shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_gets_a_free_lock_and_no_pool():
    """A fork while another thread holds the pool lock: the child's lock is free and it has no pool."""
    with nf4_cpu._POOL_LOCK:
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            os._exit(0 if nf4_cpu._POOL is None and nf4_cpu._POOL_LOCK.acquire(timeout=5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
