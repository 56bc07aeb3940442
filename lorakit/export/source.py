"""Where exported tensors come from, one at a time: a model folder (safetensors), a GGUF file, or a model in
memory; and a PEFT LoRA adapter merged into each tensor as it streams past.

Every source yields ``(transformers name, float32 tensor in transformers' layout)``; a streamed tensor is freed
before the next is read, so the writer never holds a second copy of the model. The merge is
``W' = W + scaling * B @ A`` in float32 with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA; per-module
``rank_pattern`` / ``alpha_pattern``) -- Hu et al. 2021, https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

FILE_PREFIX = "base_model.model."


class ModelSource:
    """Base class: ``config``, ``tokenizer``, ``shapes`` (name -> shape, in write order) and :meth:`tensors`."""

    config: Any
    tokenizer: Any
    shapes: dict[str, tuple[int, ...]]
    paths: tuple[Path, ...] = ()
    """Files this source reads (an export must not overwrite them)."""
    tokenizer_metadata: dict[str, Any] | None = None
    """``tokenizer.*`` keys to write as they are (a GGUF source's own), instead of converting ``tokenizer``."""
    sentencepiece_file: Path | None = None
    """The SentencePiece model (``tokenizer.model``) beside the tokenizer, when there is one: a SentencePiece
    vocabulary is written from it (its pieces' scores are not in tokenizer.json)."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError


class MemorySource(ModelSource):
    """A plain transformers model in memory (a ``PeftModel`` must be merged first)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        if hasattr(model, "peft_config") or any("lora_" in n for n, _ in model.named_parameters()):
            raise ValueError("export a plain model: call merge_and_unload() on the PeftModel first, or pass the "
                             "adapter folder as adapter= to merge it while exporting")
        if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
            raise ValueError("the model is quantized (4/8-bit linears): export from the full-precision base "
                             "(lorakit.load_model without quantization_config) and the adapter")
        self.model, self.config, self.tokenizer = model, model.config, tokenizer
        self.shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if isinstance(vocab_file, str) and vocab_file.endswith(".model") and Path(vocab_file).is_file():
            self.sentencepiece_file = Path(vocab_file)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach().float()


class FolderSource(ModelSource):
    """A transformers folder: config.json, safetensors shards (read one tensor at a time), tokenizer files."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.path = path
        self.config = AutoConfig.from_pretrained(path)
        if getattr(self.config, "quantization_config", None) is not None:
            raise ValueError(f"{path} holds a quantized model (quantization_config in config.json): export from the "
                             "full-precision base and the adapter")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / "tokenizer.model").is_file():
            self.sentencepiece_file = path / "tokenizer.model"
        self.shapes = {}
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            "model.safetensors"]
        self.paths = tuple(path / f for f in files)
        missing = [p.name for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path} has no {', '.join(missing)}: export reads safetensors weights (save the "
                                    "model with save_pretrained(..., safe_serialization=True))")
        for file in self.paths:
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                self.shapes[name] = tuple(info["shape"])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from lorakit.quant.load import iter_safetensors

        for file in self.paths:
            for name, tensor in iter_safetensors(file):
                yield name, tensor.float()


class GGUFSource(ModelSource):
    """A GGUF model file: each tensor dequantized (``gguf.quants``) and put back into transformers' layout.

    The config is rebuilt from the metadata (:func:`~lorakit.export.arch.config_from_gguf`) and the file's own
    ``tokenizer.*`` keys are written as they are; the transformers tokenizer is built only when asked for.
    """

    def __init__(self, file: Path) -> None:
        from lorakit.export.arch import ROPE_FREQS, TensorNames, config_from_gguf, parameter_names
        from lorakit.export.gguf_read import GGUFFile
        from lorakit.quant.gguf_in import check_gguf

        check_gguf(file)
        self.file = file
        self.paths = (file,)
        self.gguf = GGUFFile(file)
        self.tokenizer_metadata = {k: v for k, v in self.gguf.metadata.items() if k.startswith("tokenizer.")}
        rope = next((t for t in self.gguf.tensors if t.name == ROPE_FREQS), None)  # Llama 3.1 RoPE scaling
        factors = None if rope is None else torch.from_numpy(self.gguf.dequantized(rope))
        self.config = config_from_gguf(self.gguf.metadata, {t.name for t in self.gguf.tensors}, factors)
        self.names = TensorNames(self.config)
        to_hf = {self.names.gguf_name(n): n for n in parameter_names(self.config)}
        to_hf.pop(None, None)
        self._hf = {}
        self.shapes = {}
        for t in self.gguf.tensors:
            if t.name == ROPE_FREQS:
                continue  # in the config now; written again from it
            if t.name not in to_hf:
                raise NotImplementedError(f"{file}: tensor {t.name!r} has no transformers counterpart in "
                                          f"{type(self.config).__name__}")
            self._hf[t.name] = to_hf[t.name]
            self.shapes[to_hf[t.name]] = t.shape

    @functools.cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.file.parent, gguf_file=self.file.name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for t in self.gguf.tensors:
            if t.name not in self._hf:
                continue  # rope_freqs.weight
            tensor = torch.from_numpy(self.gguf.dequantized(t))  # (out, in) or (n,)
            yield self._hf[t.name], self.names.from_gguf_layout(t.name, tensor)


def open_source(model: str | os.PathLike | nn.Module, tokenizer: Any = None) -> ModelSource:
    """A source for a folder, a ``.gguf`` file (or a folder holding one), or an in-memory model."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("exporting an in-memory model needs its tokenizer (tokenizer=...)")
        return MemorySource(model, tokenizer)
    from lorakit.quant.gguf_in import find_gguf

    gguf_file = find_gguf(model)
    if gguf_file is not None:
        return GGUFSource(gguf_file)
    path = Path(os.path.expanduser(os.fspath(model)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model {os.fspath(model)!r} is not a model folder (no config.json) nor a .gguf "
                                f"file (relative paths are taken from {os.getcwd()})")
    return FolderSource(path)


class AdapterMerge:
    """A PEFT LoRA adapter folder, merged into base tensors one at a time (:meth:`apply`)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from lorakit.config import LoraConfig
        from lorakit.io.adapter import load_adapter_weights

        self.folder = Path(folder)
        if not (self.folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {os.fspath(folder)!r} has no adapter_config.json: not an adapter folder")
        self.config = LoraConfig.from_pretrained(os.fspath(folder))
        if self.config.use_dora:
            raise NotImplementedError("exporting a DoRA adapter (use_dora=True) to GGUF is not implemented: merge it "
                                      "with `lorakit merge` and export the merged folder")
        self.paths = tuple(p for p in self.folder.iterdir() if p.name.startswith("adapter_model"))
        tensors = load_adapter_weights(os.fspath(folder))
        self.lora: dict[str, dict[str, torch.Tensor]] = {}  # base weight name -> {"A", "B", "bias", "emb"}
        self.full: dict[str, torch.Tensor] = {}  # modules_to_save / trainable tokens: whole replacement tensors
        for key, value in tensors.items():
            name = key.removeprefix(FILE_PREFIX)
            for marker, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
                                 (".lora_embedding_A", "embA"), (".lora_embedding_B", "embB")):
                if name.endswith(marker):
                    self.lora.setdefault(name[: -len(marker)] + ".weight", {})[part] = value.float()
                    break
            else:
                if "lora_magnitude_vector" in name or ".trainable_tokens_" in name:
                    raise NotImplementedError(f"adapter tensor {key!r}: exporting it to GGUF is not implemented")
                self.full[name] = value
        self.unused = set(self.lora) | set(self.full)

    def scaling(self, weight_name: str, r: int) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)``) of the module owning ``weight_name``; ``r`` from the tensors."""
        from lorakit.config import pattern_value

        module = weight_name.removesuffix(".weight")
        alpha = pattern_value(self.config.alpha_pattern, module, self.config.lora_alpha)
        return self.config.scaling_for(r, alpha)

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (float32, transformers layout) with the adapter's change to ``name`` merged in."""
        if name in self.full:
            self.unused.discard(name)
            return self.full[name].float()
        bias_owner = name.removesuffix(".bias") + ".weight"
        if name.endswith(".bias") and "bias" in self.lora.get(bias_owner, {}):
            parts = self.lora[bias_owner]  # lora_bias: PEFT merges scaling * B's bias into the base bias
            return tensor + self.scaling(bias_owner, parts["A"].shape[0]) * parts["bias"]
        parts = self.lora.get(name)
        if parts is None:
            return tensor
        self.unused.discard(name)
        if "A" in parts:
            a, b = parts["A"], parts["B"]  # (r, in), (out, r)
            return tensor + self.scaling(name, a.shape[0]) * (b @ a)  # (out, in)
        a, b = parts["embA"], parts["embB"]  # (r, num_embeddings), (dim, r)
        return tensor + self.scaling(name, a.shape[0]) * (b @ a).T  # (num_embeddings, dim)

    def check_all_used(self) -> None:
        """Every adapter tensor found its base tensor (else the adapter belongs to another model)."""
        if self.unused:
            raise ValueError(f"adapter {self.folder}: {len(self.unused)} tensors match no base model tensor "
                             f"(e.g. {sorted(self.unused)[:3]}): was it trained on another base model?")
