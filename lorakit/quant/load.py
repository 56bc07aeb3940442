"""Load a causal LM with its linear layers quantized while the weights stream in from safetensors shards.

The model is built with parameters on the meta device (buffers such as rotary ``inv_freq`` are real); each
tensor is then read from its shard with a plain file read (no mmap, so finished shards leave nothing in
RSS), quantized if it is the weight of a linear layer to quantize (in steps of 2**20 elements, so the fp32
temporaries are those of one step), freed, and the freed heap is given back to the OS (``malloc_trim``).
Peak host memory is about the quantized model plus the largest single tensor, not the full-precision model.

The saved layout is transformers + bitsandbytes': ``config.json`` carries ``quantization_config`` and each
4-bit linear writes ``weight`` (packed) and ``weight.absmax`` / ``weight.quant_map`` / ... (see
``lorakit.quant.nf4.QuantState.as_dict``); 8-bit linears write ``weight`` (int8), ``SCB``, ``weight_format``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from lorakit.quant.config import BLOCKSIZE_4BIT, BitsAndBytesConfig
from lorakit.quant.linear4bit import Linear4bit
from lorakit.quant.linear8bit import Linear8bitLt

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def load_model(
    name_or_path: str | os.PathLike,
    quantization_config: BitsAndBytesConfig | dict[str, Any] | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``AutoModelForCausalLM`` weights from a local folder or a Hub id (huggingface_hub's cache).

    Args:
        name_or_path: folder with config.json and ``*.safetensors`` (sharded or not), a Hub repo id, or a
            ``.gguf`` file / a folder holding one (dequantized by ``lorakit.quant.gguf_in``, then quantized
            with ``quantization_config`` when given).
        quantization_config: quantize linear layers while loading (not the output embeddings / lm_head, nor
            ``llm_int8_skip_modules``). A folder already quantized by transformers + bitsandbytes (or by us)
            is loaded as stored and its own ``quantization_config`` wins.
        torch_dtype: dtype of the non-quantized parameters and of the weights before quantization
            (default: config.json's ``dtype`` / ``torch_dtype``, else float32).
        device: where the model ends up (default CPU).
        attn_implementation: transformers' attention ("eager", "sdpa", "flash_attention_2", ...; default: its
            choice), checked by transformers when the model is built.
        revision: the Hub revision (branch, tag or commit) of a Hub id; a local folder is read as it is.
        trust_remote_code: allow the model's own code from the folder / Hub repo (as in transformers).

    Returns:
        ``(model, tokenizer)``; the tokenizer is None when the folder has none.
    """
    from transformers import AutoConfig

    from lorakit.quant.gguf_in import find_gguf, load_gguf

    if (gguf_file := find_gguf(name_or_path)) is not None:
        model, tokenizer = load_gguf(gguf_file, _resolve_dtype(torch_dtype, None), device, attn_implementation)
        return (model if quantization_config is None else quantize_model(model, quantization_config)), tokenizer
    path = _resolve(name_or_path, revision)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    qconfig, prequantized = stored_quantization(config, quantization_config, path)
    dtype = _resolve_dtype(torch_dtype, config)

    model = _empty_model(config, dtype, attn_implementation, trust_remote_code)
    if qconfig is not None and (qconfig.load_in_4bit or qconfig.load_in_8bit):
        _replace_linears(model, qconfig, device="meta")
    quantized = {name for name, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bitLt))}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # prequantized pieces per module
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    unexpected = []
    for key, tensor in _iter_checkpoint(path):
        owner = _quantized_owner(key, quantized)
        if owner is not None and (prequantized or not key.endswith(".bias")):
            if prequantized:
                pending.setdefault(owner, {})[key[len(owner) + 1 :]] = tensor
            else:
                model.get_submodule(owner).set_weight(tensor.to(dtype))
                del tensor  # the full-precision weight: free it before reading the next one
                _release_free_memory()
        elif key in params:
            _assign(model, key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        else:
            unexpected.append(key)
    for owner, pieces in pending.items():
        module = model.get_submodule(owner)
        module.load_state_dict(_to_dtype(pieces, dtype), strict=True, assign=True)
    if unexpected:
        raise ValueError(f"checkpoint keys not in {type(model).__name__}: {unexpected[:8]}")
    _finish(model, qconfig)
    if device is not None:
        model.to(device)
    return model.eval(), _load_tokenizer(path, trust_remote_code)


def stored_quantization(
    config: Any, requested: BitsAndBytesConfig | dict[str, Any] | None, path: str | os.PathLike
) -> tuple[BitsAndBytesConfig | None, bool]:
    """``(quantization to load with, whether the folder is already quantized)`` for a model folder's `config`: a
    folder quantized by transformers + bitsandbytes (or by us) is loaded as stored, so its own
    ``quantization_config`` wins over `requested` (with a warning when they differ)."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return _as_config(requested), False
    stored_cfg = BitsAndBytesConfig.from_dict(stored if isinstance(stored, dict) else stored.to_dict())
    if requested is not None and _as_config(requested) != stored_cfg:
        warnings.warn(f"{path} is already quantized; its quantization_config is used, not the one passed",
                      stacklevel=3)
    return stored_cfg, True


def quantize_model(model: nn.Module, config: BitsAndBytesConfig | dict[str, Any]) -> nn.Module:
    """Quantize an in-memory model's linear layers in place (same rules as :func:`load_model`); returns it.

    Each weight is quantized in its current dtype, which becomes the quant state's dtype.
    """
    qconfig = _as_config(config)
    if qconfig is None or not (qconfig.load_in_4bit or qconfig.load_in_8bit):
        raise ValueError("quantize_model needs a config with load_in_4bit=True or load_in_8bit=True")
    _replace_linears(model, qconfig, device=None)
    _finish(model, qconfig)
    return model


def modules_to_not_convert(model: nn.Module, skip_modules: list[str] | None) -> list[str]:
    """Output embeddings (lm_head) and parameters tied to them, plus ``skip_modules``.

    Unlike transformers, lm_head stays unquantized even when ``llm_int8_skip_modules`` is given.
    """
    names: set[str] = set(skip_modules or [])
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    names |= {name for name, m in model.named_modules() if out is not None and m is out}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names |= {k.removesuffix(".weight") for pair in tied.items() for k in pair}
    return sorted(names)


def should_quantize(name: str, skip: list[str]) -> bool:
    """transformers' rule: skip when a pattern matches from the start to a module boundary, as a regex with
    the same boundary, or as a suffix (``"fc1"`` skips ``"model.layers.0.fc1"``)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in skip)


def _replace_linears(model: nn.Module, qconfig: BitsAndBytesConfig, device: str | None) -> None:
    skip = modules_to_not_convert(model, qconfig.llm_int8_skip_modules)
    targets = [
        name for name, m in model.named_modules() if type(m) is nn.Linear and should_quantize(name, skip)
    ]  # fmt: skip
    for name in targets:
        linear = model.get_submodule(name)
        if device == "meta":
            new = _empty_quantized(linear, qconfig)
        elif qconfig.load_in_4bit:
            new = Linear4bit.from_linear(
                linear, qconfig.bnb_4bit_compute_dtype, qconfig.bnb_4bit_quant_type, BLOCKSIZE_4BIT,
                qconfig.bnb_4bit_use_double_quant, qconfig.bnb_4bit_quant_storage,
            )  # fmt: skip
        else:
            new = Linear8bitLt.from_linear(linear, threshold=qconfig.llm_int8_threshold)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def _empty_quantized(linear: nn.Linear, qconfig: BitsAndBytesConfig) -> nn.Module:
    """A quantized layer shell on the meta device (filled by set_weight / load_state_dict while loading)."""
    bias = linear.bias is not None
    if qconfig.load_in_8bit:
        return Linear8bitLt(
            linear.in_features, linear.out_features, bias, threshold=qconfig.llm_int8_threshold, device="meta"
        )
    return Linear4bit(
        linear.in_features, linear.out_features, bias, qconfig.bnb_4bit_compute_dtype, qconfig.bnb_4bit_quant_type,
        BLOCKSIZE_4BIT, qconfig.bnb_4bit_use_double_quant, qconfig.bnb_4bit_quant_storage, device="meta",
    )  # fmt: skip


def _finish(model: nn.Module, qconfig: BitsAndBytesConfig | None) -> None:
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    missing += [f"{n}.weight.quant_state" for n, m in model.named_modules() if _has_meta_state(m)]
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:8]}")
    if qconfig is not None and (qconfig.load_in_4bit or qconfig.load_in_8bit):
        model.config.quantization_config = qconfig.to_dict()
        model.is_loaded_in_4bit = qconfig.load_in_4bit  # flags read by PEFT-style code
        model.is_loaded_in_8bit = qconfig.load_in_8bit
        model.is_quantized = True


def _has_meta_state(module: nn.Module) -> bool:
    return isinstance(module, Linear4bit) and module.weight.quant_state.absmax.is_meta


def _empty_model(
    config: Any, dtype: torch.dtype, attn_implementation: str | None = None, trust_remote_code: bool = False
) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary inv_freq etc. stay real
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = tensor


def _quantized_owner(key: str, quantized: set[str]) -> str | None:
    owner = key
    while "." in owner:
        owner = owner.rpartition(".")[0]
        if owner in quantized:
            return owner
    return None


def _to_dtype(pieces: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast the bias of a prequantized layer; the quantized pieces keep their stored dtypes."""
    return {k: (v.to(dtype) if k == "bias" else v) for k, v in pieces.items()}


def _iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for shard in shards:
        yield from iter_safetensors(path / shard)


def iter_safetensors(file: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a .safetensors file, reading one tensor at a time with ``readinto``.

    Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then
    the data (https://github.com/huggingface/safetensors).
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            yield name, _read_tensor(f, base, info)  # no reference kept here: the caller decides when it is freed


def _read_tensor(f: BinaryIO, base: int, info: dict[str, Any]) -> torch.Tensor:
    start, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    buf = bytearray(end - start)
    f.seek(base + start)
    f.readinto(buf)
    flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)  # shares buf's memory
    return flat.reshape(info["shape"])


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    After freeing a large block glibc raises its mmap threshold, so later multi-MB temporaries of
    ``quantize_4bit`` come from the heap and stay resident once freed; trimming after each quantized weight
    cut the peak RSS growth of ``bench/bench_quant.py --only load`` (see docs/benchmarks.md).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def _resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
    return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=patterns))


def _resolve_dtype(torch_dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    value = torch_dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {value!r}")
    return dtype


def _as_config(config: BitsAndBytesConfig | dict[str, Any] | Any | None) -> BitsAndBytesConfig | None:
    if config is None or isinstance(config, BitsAndBytesConfig):
        return config
    if isinstance(config, dict):
        return BitsAndBytesConfig.from_dict(config)
    if callable(getattr(config, "to_dict", None)):  # e.g. transformers.BitsAndBytesConfig
        return BitsAndBytesConfig.from_dict(config.to_dict())
    raise TypeError(f"quantization_config must be a BitsAndBytesConfig or dict, got {type(config).__name__}")


def _load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
