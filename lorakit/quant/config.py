"""``BitsAndBytesConfig``: transformers' quantization config (same field names and defaults), validated.

Recipes written for transformers port by changing the import. The 4-bit blocksize is 64, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from lorakit.quant.nf4 import QUANT_TYPES

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STORAGE_DTYPES = (
    torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int16, torch.int32,
)  # fmt: skip
BLOCKSIZE_4BIT = 64  # transformers always quantizes with blocksize 64


@dataclass
class BitsAndBytesConfig:
    """How to quantize a model's linear layers when loading it (``lorakit.load_model``)."""

    load_in_8bit: bool = False
    """Row-wise absmax int8 weights (bitsandbytes' Linear8bitLt layout)."""
    load_in_4bit: bool = False
    """Blockwise 4-bit weights (QLoRA)."""
    llm_int8_threshold: float = 6.0
    """LLM.int8() outlier threshold, kept and saved as given. lorakit's 8-bit layers store bitsandbytes' row-wise
    int8 weights but never quantize activations (dequantize, then one matmul in the compute dtype): every input
    column is computed the way LLM.int8() computes its outlier columns, so the threshold has nothing to select and
    outputs are those of the dequantized weight (not bitsandbytes' int8 matmul, which quantizes the others)."""
    llm_int8_skip_modules: list[str] | None = None
    """Module names (exact or ``.suffix``) kept in full precision; ``lm_head`` is always kept."""
    llm_int8_enable_fp32_cpu_offload: bool = False
    """Not implemented (True raises)."""
    llm_int8_has_fp16_weight: bool = False
    """Not implemented (True raises)."""
    bnb_4bit_quant_type: str = "fp4"
    """"nf4" or "fp4" (transformers' default is "fp4"; QLoRA recipes set "nf4")."""
    bnb_4bit_use_double_quant: bool = False
    """Quantize the absmax statistics to 8 bits too (~0.37 fewer bits per parameter)."""
    bnb_4bit_compute_dtype: torch.dtype | str | None = None
    """dtype of the dequantized weight and the matmul; None means float32 (transformers' default)."""
    bnb_4bit_quant_storage: torch.dtype | str | None = None
    """dtype the packed 4-bit bytes are stored as (uint8 by default; bf16 for FSDP)."""

    def __post_init__(self) -> None:
        self.bnb_4bit_compute_dtype = _to_dtype(
            "bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype or torch.float32, _COMPUTE_DTYPES
        )
        self.bnb_4bit_quant_storage = _to_dtype(
            "bnb_4bit_quant_storage", self.bnb_4bit_quant_storage or torch.uint8, _STORAGE_DTYPES
        )
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True; choose one")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {self.bnb_4bit_quant_type!r}")
        if self.llm_int8_skip_modules is not None and (
            isinstance(self.llm_int8_skip_modules, str)
            or not all(isinstance(m, str) for m in self.llm_int8_skip_modules)
        ):
            raise ValueError(f"llm_int8_skip_modules must be a list of str, got {self.llm_int8_skip_modules!r}")
        threshold = self.llm_int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0:
            raise ValueError(f"llm_int8_threshold must be a number >= 0, got {threshold!r}")
        for name in ("llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight"):
            if getattr(self, name):
                raise NotImplementedError(f"{name}=True is not implemented; leave it False")

    @property
    def quant_method(self) -> str:
        return "bitsandbytes"

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json, as transformers writes it."""
        out: dict[str, Any] = {
            "quant_method": self.quant_method,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
        }
        for f in fields(self):
            if f.name not in ("load_in_8bit", "load_in_4bit"):
                value = getattr(self, f.name)
                out[f.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        out["load_in_4bit"], out["load_in_8bit"] = self.load_in_4bit, self.load_in_8bit
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BitsAndBytesConfig:
        """From a config.json ``quantization_config`` (or transformers' ``BitsAndBytesConfig.to_dict()``)."""
        method = str(config.get("quant_method", "bitsandbytes"))
        method = getattr(config.get("quant_method"), "value", method)
        if method != "bitsandbytes":
            raise ValueError(f"quant_method must be 'bitsandbytes', got {method!r}")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        kwargs.setdefault("load_in_4bit", bool(config.get("_load_in_4bit", False)))
        kwargs.setdefault("load_in_8bit", bool(config.get("_load_in_8bit", False)))
        return cls(**kwargs)


def _to_dtype(field: str, value: torch.dtype | str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in allowed:
        names = [str(d).removeprefix("torch.") for d in allowed]
        raise ValueError(f"{field} must be one of {names}, got {value!r}")
    return dtype
