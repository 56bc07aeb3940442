"""GGUF in: a ``.gguf`` file (or a folder holding one) as a plain, trainable, saveable transformers model.

transformers reads GGUF with ``from_pretrained(folder, gguf_file=name)`` and dequantizes every tensor
(Q4_1, Q8_0, ... -> float) into an ordinary ``LlamaForCausalLM`` (etc.). It still marks the model as
quantized with ``quant_method="gguf"`` (``hf_quantizer`` and ``config.quantization_config``), which makes
``save_pretrained`` refuse and PEFT-style code think the weights are packed; they are not, so the marks are
cleared here. The tokenizer and chat template come from the file's ``tokenizer.*`` metadata.

Before transformers runs, the header is read (no tensor data) to refuse what it would fail on later, with the
architecture or tensor type named: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

GGUF_SUFFIX = ".gguf"


def find_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file that ``name_or_path`` names: the path itself when it ends in ``.gguf``, or the single
    ``.gguf`` file of a folder without ``config.json``; None when it is not a GGUF model.

    Raises:
        FileNotFoundError: a ``.gguf`` path that does not exist.
        ValueError: a folder with several ``.gguf`` files (which one is meant is not guessed).
    """
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(name_or_path)!r} does not exist (relative paths are taken from "
                                    f"the current directory, {os.getcwd()})")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ValueError(f"{str(name_or_path)!r} holds several GGUF files ({names}): give the path of the one to load")
    return files[0] if files else None


def pretrained_args(name_or_path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """``(first argument, keyword arguments)`` for any transformers ``from_pretrained`` (config, tokenizer,
    model): a GGUF file, or a folder holding one, gives its folder and ``gguf_file=<name>`` (header checked by
    `check_gguf`); anything else passes through unchanged.

    Raises what `find_gguf` and `check_gguf` raise (missing file, several files, unsupported GGUF).
    """
    file = find_gguf(name_or_path)
    if file is None:
        return os.fspath(name_or_path), {}
    check_gguf(file)
    return str(file.parent), {"gguf_file": file.name}


def supported_architectures() -> list[str]:
    """GGUF ``general.architecture`` values transformers' loader reads (legacy table plus the newer path)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:  # older transformers: the legacy table only
        pass
    return sorted(names)


def supported_tensor_types() -> list[str]:
    """ggml tensor types that dequantize on CPU: the float types and every type ``gguf.quants`` implements."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import _type_traits

    return sorted({T.F32.name, T.F16.name, T.BF16.name} | {t.name for t in _type_traits})


def check_gguf(file: str | os.PathLike) -> dict[str, Any]:
    """Read the header of ``file`` (no tensor data); refuse an architecture or tensor type that cannot be loaded.

    Returns ``{"architecture", "name", "tensor_types": {type: count}, "rope_factors", "head_dim"}``
    (``rope_freqs.weight`` of Llama 3.1's RoPE scaling, and ``<arch>.attention.key_length``; None when absent).
    """
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError("loading a .gguf model needs the gguf package: pip install 'lorakit[gguf]' "
                          "(or pip install gguf)") from err
    try:
        reader = GGUFReader(os.fspath(file))
    except (ValueError, OSError, IndexError) as err:
        raise ValueError(f"{os.fspath(file)!r} is not a readable GGUF file ({err}); is it complete?") from err
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{os.fspath(file)!r} has no general.architecture: not a GGUF model file")
    arch = field.contents()
    if str(getattr(reader.fields.get("general.type"), "contents", lambda: "model")()) == "adapter":
        raise ValueError(f"{os.fspath(file)!r} is a GGUF LoRA adapter (general.type = adapter), not a model: give its "
                         "base model as the model")
    supported = supported_architectures()
    if arch not in supported:
        raise ValueError(f"{os.fspath(file)!r}: GGUF architecture {arch!r} cannot be loaded by transformers "
                         f"{_transformers_version()}; supported: {', '.join(supported)}")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    allowed = set(supported_tensor_types())
    bad = sorted(set(counts) - allowed)
    if bad:
        raise ValueError(f"{os.fspath(file)!r} stores tensors of type {', '.join(bad)}, which cannot be dequantized "
                         f"here; supported: {', '.join(sorted(allowed))}")
    name = reader.fields.get("general.name")
    rope = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)  # Llama 3.1 RoPE scaling
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    return {"architecture": arch, "name": name.contents() if name is not None else None, "tensor_types": counts,
            "rope_factors": None if rope is None else torch.from_numpy(rope.data.astype("float32").reshape(-1)),
            "head_dim": None if key_length is None else int(key_length.contents())}


def load_gguf(
    file: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a GGUF file: weights dequantized to ``torch_dtype`` (default float32), the
    GGUF quantization marks removed so the model trains and saves like any transformers model.

    The tokenizer carries the file's chat template; a missing pad token is set to EOS (padding takes no loss).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(file)
    info = check_gguf(file)
    kwargs: dict[str, Any] = {"gguf_file": file.name, "dtype": torch_dtype or torch.float32}
    config = _config_fixed(file, info)
    if config is not None:
        kwargs["config"] = config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(file.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    clear_gguf_marks(model)
    model.config._name_or_path = str(file)
    model.name_or_path = str(file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def gguf_config(file: str | os.PathLike) -> Any:
    """transformers' config of a GGUF model file, with what its GGUF loader leaves out put back (`_config_fixed`)."""
    from transformers import AutoConfig

    file = Path(file)
    return _config_fixed(file, check_gguf(file)) or AutoConfig.from_pretrained(file.parent, gguf_file=file.name)


def _config_fixed(file: Path, info: dict[str, Any]) -> Any:
    """transformers' config of the GGUF with what its GGUF loader (5.x) leaves out put back, or None when nothing
    is: Llama 3.1's RoPE scaling (the ``rope_freqs.weight`` tensor, skipped by the loader) and the head size
    (``attention.key_length``, which its ``qwen3`` mapping does not read: it would take Qwen3Config's default)."""
    from transformers import AutoConfig

    if info["rope_factors"] is None and info["head_dim"] is None:
        return None  # nothing that could be missing: no second read of the file's metadata
    config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    changed = False
    if info["rope_factors"] is not None:
        from lorakit.export.arch import llama3_rope_from_factors

        factors = info["rope_factors"]
        config.rope_parameters = llama3_rope_from_factors(factors, config.rope_parameters["rope_theta"],
                                                          2 * factors.numel(), config)
        changed = True
    if info["head_dim"] is not None and getattr(config, "head_dim", info["head_dim"]) != info["head_dim"]:
        config.head_dim = info["head_dim"]
        changed = True
    return config if changed else None


def clear_gguf_marks(model: nn.Module) -> None:
    """Drop the ``quant_method="gguf"`` marks of a model whose weights transformers already dequantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) != "gguf":
        return  # another quantizer: not ours to clear
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:  # transformers kept GGUF blocks (its kernels path): these are not plain weights
        raise NotImplementedError(f"the GGUF model kept packed GGUF layers ({packed[:3]}): lorakit trains on "
                                  "dequantized weights only")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
