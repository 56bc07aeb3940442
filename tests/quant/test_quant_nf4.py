"""lorakit.quant.nf4 against bitsandbytes-on-CPU (oracle) and the reference file's test vectors.

Tolerances: the 4-bit path is compared bit for bit (torch.equal). The only non-exact comparison is the nested
(double-quant) 8-bit codes: we round to the exact nearest dynamic-map value (ties low, as bitsandbytes' CUDA
kernel does); bitsandbytes' CPU C++ kernel rounds through a 65536-entry lookup table over [-1, 1] and picks
another code on ~0.1-0.2% of codes (reference/nf4-format.md). So where codes differ we require ours to be the
closer one and theirs to be off by at most one table cell (2 / 65535), on at most 1% of codes.
"""

import hashlib
import json

import pytest
import torch

from lorakit.quant.nf4 import (
    ALLOWED_BLOCKSIZES,
    QuantState,
    create_dynamic_map,
    dequantize_4bit,
    dequantize_absmax,
    get_4bit_code,
    quantize_4bit,
)

bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (32, 96), (7, 33), (1, 129), (3, 5, 64), (300,)]


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    return packed.reshape(-1).view(torch.uint8)


def _oracle_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own formula (its AVX512 kernel is wrong when shape[-1] % blocksize != 0: reference)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(
        _bytes(packed), absmax.float(), state.code, state.blocksize, state.shape, state.dtype
    )


def _sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(shape) * torch.rand(shape[-1]) * 3  # varied block scales
    return x.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_exact_vs_bitsandbytes(shape, dtype, quant_type):
    A = _sample(shape, dtype)
    for blocksize in (32, 64, 128):
        packed, state = quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        ref_packed, ref_state = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(_bytes(packed), _bytes(ref_packed))
        assert torch.equal(state.absmax, ref_state.absmax)
        assert torch.equal(state.code, ref_state.code)
        out = dequantize_4bit(packed, state)
        assert out.dtype == dtype and out.shape == A.shape
        assert torch.equal(out, _oracle_dequant(ref_packed, ref_state))


@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_all_blocksizes(blocksize):
    A = _sample((40, 200), torch.bfloat16)  # 8000 elements: partial last block for every blocksize > 32
    packed, state = quantize_4bit(A, blocksize=blocksize)
    ref_packed, ref_state = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(_bytes(packed), _bytes(ref_packed))
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_4bit(packed, state), _oracle_dequant(ref_packed, ref_state))


def test_matches_bitsandbytes_cpu_kernel_on_llm_shapes():
    """Where bitsandbytes' C++ dequant kernel is correct (last dim % blocksize == 0), we match the kernel too."""
    A = _sample((96, 128), torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(A, quant_type=quant_type, compress_statistics=True)
        ref_packed, ref_state = bnbF.quantize_4bit(A, quant_type=quant_type, compress_statistics=False)
        assert torch.equal(dequantize_4bit(ref_packed, ref_state), bnbF.dequantize_4bit(ref_packed, ref_state))
        bnb_state = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
        assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, bnb_state))


def _assert_nested_codes_close(ours: torch.Tensor, theirs: torch.Tensor, values: torch.Tensor, state) -> None:
    """Nested codes: equal, or ours is the exact nearest and theirs misses it by at most one cell (2 / 65535)
    of bitsandbytes' CPU lookup table (module doc), on at most 1% of the codes."""
    bad = ours != theirs
    assert bad.float().mean() <= 0.01
    if bad.any():
        dyn = state.state2.code
        scale = state.state2.absmax.repeat_interleave(256)[: values.numel()]
        target = (values / scale)[bad]  # the scaled input the 8-bit code approximates
        our_err = (dyn[ours[bad].long()] - target).abs()
        their_err = (dyn[theirs[bad].long()] - target).abs()
        assert (our_err <= their_err).all()
        assert (their_err - our_err).max() <= 2 / 65535


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_double_quant_vs_bitsandbytes(dtype, quant_type):
    A = _sample((256, 192), dtype)  # 768 blocks of 64 -> 3 nested blocks of 256
    packed, state = quantize_4bit(A, quant_type=quant_type, compress_statistics=True)
    ref_packed, ref_state = bnbF.quantize_4bit(A, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(_bytes(packed), _bytes(ref_packed))
    assert torch.equal(state.offset, ref_state.offset)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert torch.equal(state.state2.code, ref_state.state2.code)
    fp32_absmax = bnbF.quantize_4bit(A, quant_type=quant_type)[1].absmax
    _assert_nested_codes_close(state.absmax, ref_state.absmax, fp32_absmax - state.offset, state)
    # With identical codes, the dequantized absmax and values are bit-exact: run the oracle on OUR state.
    bnb_state = bnbF.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(
        dequantize_absmax(state), bnbF.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
    )
    assert torch.equal(dequantize_4bit(packed, state), _oracle_dequant(packed, bnb_state))


def test_double_quant_many_blocks_partial_nested_block():
    A = _sample((1000, 64 * 7 + 3), torch.float32)  # 7051 blocks of 64 -> 28 nested blocks, last partial
    _, state = quantize_4bit(A, compress_statistics=True)
    _, ref_state = bnbF.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    fp32_absmax = quantize_4bit(A)[1].absmax
    _assert_nested_codes_close(state.absmax, ref_state.absmax, fp32_absmax - state.offset, state)


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_quant_storage_bf16(compress_statistics):
    A = _sample((64, 128), torch.bfloat16)
    packed, state = quantize_4bit(A, compress_statistics=compress_statistics, quant_storage=torch.bfloat16)
    ref_packed, _ = bnbF.quantize_4bit(
        A, quant_type="nf4", compress_statistics=compress_statistics, quant_storage=torch.bfloat16
    )
    assert packed.dtype == torch.bfloat16 and packed.shape == ref_packed.shape == (64 * 128 // 4, 1)
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    uint8_packed, _ = quantize_4bit(A, compress_statistics=compress_statistics)
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(uint8_packed, state))


def test_serialization_matches_bitsandbytes():
    A = _sample((128, 128), torch.float32)
    for compress in (False, True):
        _, state = quantize_4bit(A, compress_statistics=compress)
        _, ref_state = bnbF.quantize_4bit(A, quant_type="nf4", compress_statistics=compress)
        ours, theirs = state.as_dict(packed=True), ref_state.as_dict(packed=True)
        assert list(ours) == list(theirs)
        key = "quant_state.bitsandbytes__nf4"
        assert torch.equal(ours[key], theirs[key])  # identical JSON bytes
        assert torch.equal(ours["quant_map"], theirs["quant_map"])
        back = QuantState.from_dict({f"model.proj.weight.{k}": v for k, v in theirs.items()})
        assert torch.equal(back.absmax, ref_state.absmax) and back.shape == ref_state.shape
        assert back.nested == compress and back.dtype == torch.float32
        assert torch.equal(dequantize_absmax(back), dequantize_absmax(ref_state))


def test_reference_vectors():
    """Test vectors of ../shared/reference/nf4-format.md (blocksize 64, input shape (1, 128))."""
    i = torch.arange(128, dtype=torch.float32)
    A = (torch.sin(0.37 * i + 0.1) * (1 + (i % 7) / 3)).reshape(1, 128)
    packed, state = quantize_4bit(A)
    assert _bytes(packed).numpy().tobytes().hex() == (
        "79cdeee97531004458befbcca84143223589bdeeec7632101568bdefbba84204"
        "32358cacdddb8642111268adeffa97521043458cebcdcb7453211258acdeee97"
    )
    assert state.absmax.tolist() == [2.9986815452575684, 2.9713480472564697]
    assert dequantize_4bit(packed, state)[0, :8].tolist() == [
        0.0, 0.48257842659950256, 1.3215484619140625, 1.6871092319488525, 2.167917251586914,
        2.167917251586914, 2.167917251586914, 0.48257842659950256,
    ]  # fmt: skip
    _, dq = quantize_4bit(A, compress_statistics=True)
    assert dq.absmax.tolist() == [255, 0]
    assert dq.offset.item() == 2.9850149154663086
    assert dq.state2.absmax.tolist() == [0.013666868209838867]
    assert dequantize_absmax(dq).tolist() == [2.9986817836761475, 2.9714441299438477]
    assert json.loads(bytes(dq.as_dict()["quant_state.bitsandbytes__nf4"].tolist())) == {
        "quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [1, 128],
        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.9850149154663086,
    }  # fmt: skip


def test_small_example_and_code_books():
    packed, state = quantize_4bit(torch.tensor([1.0, -0.5, 0.25, 0.0, -1.0, 0.7, 0.1, -0.05]))
    assert _bytes(packed).numpy().tobytes().hex() == "f2a70e86" and state.absmax.tolist() == [1.0]
    dyn = create_dynamic_map()
    digest = hashlib.sha256(dyn.numpy().astype("<f4").tobytes()).hexdigest()
    assert digest == "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
    assert torch.equal(
        get_4bit_code("fp4")[:8],
        torch.tensor(
            [0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25]
        ),
    )
    assert get_4bit_code("nf4").shape == (16,) and get_4bit_code("nf4")[7] == 0


def test_zero_blocks_and_odd_numel():
    A = torch.zeros(3, 64)
    A[1] = torch.randn(64)
    packed, state = quantize_4bit(A)
    assert state.absmax[0] == 0 and state.absmax[2] == 0  # full all-zero block stores 0.0
    assert torch.equal(dequantize_4bit(packed, state), _oracle_dequant(packed, state))
    odd = torch.randn(5, 13)  # 65 elements: partial last block of 1, padded final nibble
    packed, state = quantize_4bit(odd)
    ref_packed, ref_state = bnbF.quantize_4bit(odd, quant_type="nf4")
    assert packed.shape == (33, 1) and torch.equal(packed, ref_packed)
    assert _bytes(packed)[-1] & 0xF == 7  # pad 0.0 -> NF4 code 7
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_4bit(packed, state), _oracle_dequant(ref_packed, ref_state))


def test_round_trip_error_on_normal():
    A = torch.randn(256, 256)
    errors = {qt: (A - dequantize_4bit(*quantize_4bit(A, quant_type=qt))).abs().mean().item() for qt in ("nf4", "fp4")}
    assert errors["nf4"] == pytest.approx(0.0728, rel=0.03)  # reference: NF4 0.0728, FP4 0.0966 on N(0, 1)
    assert errors["fp4"] == pytest.approx(0.0966, rel=0.03)


def test_errors_list_allowed_values():
    A = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64"):
        quantize_4bit(A, blocksize=48)
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"):
        quantize_4bit(A, quant_type="int4")
    with pytest.raises(ValueError, match="input dtype must be one of"):
        quantize_4bit(A.to(torch.int32))
    with pytest.raises(ValueError, match="multiple of 4"):
        quantize_4bit(torch.randn(2, 3), quant_storage=torch.float32)
    packed, state = quantize_4bit(A)
    other_packed, other_state = quantize_4bit(torch.randn(4, 64))
    with pytest.raises(ValueError, match="needs 256"):
        dequantize_4bit(other_packed, state)
    other_state.shape = torch.Size((8, 64))
    with pytest.raises(ValueError, match="absmax has 4 entries"):
        dequantize_4bit(packed, other_state)
    with pytest.raises(ValueError, match="missing"):
        QuantState.from_dict({"absmax": state.absmax})
