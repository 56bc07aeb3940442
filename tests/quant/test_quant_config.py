"""BitsAndBytesConfig against transformers' (oracle): same fields, defaults and config.json entry."""

import json

import pytest
import torch
import transformers

from lorakit.quant.config import BitsAndBytesConfig

CASES = [
    {"load_in_4bit": True},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
     "bnb_4bit_compute_dtype": torch.bfloat16, "llm_int8_skip_modules": ["mlp.down_proj"]},
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_storage": torch.bfloat16},
    {"load_in_8bit": True, "llm_int8_threshold": 0.0},
    {"load_in_8bit": True},  # transformers' default threshold 6.0: kept and saved (our layers need none)
]  # fmt: skip


@pytest.mark.parametrize("kwargs", CASES)
def test_to_dict_matches_transformers(kwargs):
    ours = BitsAndBytesConfig(**kwargs)
    theirs = transformers.BitsAndBytesConfig(**kwargs)
    assert ours.to_dict() == json.loads(json.dumps(theirs.to_dict()))
    assert list(ours.to_dict()) == list(theirs.to_dict())
    assert BitsAndBytesConfig.from_dict(theirs.to_dict()) == ours
    assert BitsAndBytesConfig.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


def test_defaults_match_transformers():
    ours, theirs = BitsAndBytesConfig(load_in_4bit=True), transformers.BitsAndBytesConfig(load_in_4bit=True)
    assert ours.bnb_4bit_quant_type == theirs.bnb_4bit_quant_type == "fp4"
    assert ours.bnb_4bit_compute_dtype == theirs.bnb_4bit_compute_dtype == torch.float32
    assert ours.bnb_4bit_quant_storage == theirs.bnb_4bit_quant_storage == torch.uint8
    assert ours.llm_int8_threshold == theirs.llm_int8_threshold == 6.0


def test_validation_errors():
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type must be one of \('nf4', 'fp4'\)"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype must be one of"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float64")
    with pytest.raises(ValueError, match="choose one"):
        BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="llm_int8_skip_modules must be a list"):
        BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules="lm_head")
    with pytest.raises(ValueError, match="llm_int8_threshold must be a number >= 0, got -1"):
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=-1)
    with pytest.raises(NotImplementedError, match="llm_int8_enable_fp32_cpu_offload"):
        BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=True)
    with pytest.raises(ValueError, match="quant_method must be 'bitsandbytes'"):
        BitsAndBytesConfig.from_dict({"quant_method": "gptq"})
