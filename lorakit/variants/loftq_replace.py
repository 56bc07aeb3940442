"""LoftQ for an already-quantized model: PEFT's ``replace_lora_weights_loftq``.

LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659) chooses the adapter so that the quantized base plus the
adapter approximates the full-precision weight. Here the base is already quantized (``Q``, 4-bit: lorakit's
``Linear4bit`` or bitsandbytes'), so one step of LoftQ's alternation is left: with ``W`` read back from the model's
safetensors checkpoint,

    s B A = SVD_r(W - dequant(Q))        (``lorakit.variants.init.loftq_factors``)

and ``||W - (dequant(Q) + s B A)||_F <= ||W - dequant(Q)||_F`` for every replaced layer (equality only when the
residual is already zero). The base is left as it is. PEFT splits ``sqrt(S_r)`` without the ``/ s``: the same
factors when ``lora_alpha = r`` (s = 1); for other alphas PEFT's ``Q + s B A`` overshoots ``W``, ours does not.

Differences from PEFT 0.21.2, all on inputs PEFT cannot handle or gets wrong: it runs on any device (PEFT sends
the weights to "cuda"/"xpu"); every checkpoint key and its shape (from the safetensors headers) are checked before the
first layer is changed (PEFT fails midway, with the earlier layers already replaced); a DoRA adapter's magnitude is
set to ``||Q + s B A||_c`` afterwards, as after lorakit's other inits (PEFT keeps the magnitude of the old factors);
layers without ``adapter_name`` are skipped (PEFT raises a ``KeyError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class _Checkpoint:
    """Lazy reads from a safetensors checkpoint: one ``model.safetensors``, or shards listed by an index json."""

    def __init__(self, path: Path) -> None:
        if path.is_dir():
            if (path / _INDEX).is_file():
                path = path / _INDEX
            elif (path / _SINGLE).is_file():
                path = path / _SINGLE
            else:
                raise FileNotFoundError(
                    f"no {_SINGLE} or {_INDEX} in {path}: replace_lora_weights_loftq reads the full-precision "
                    "weights from safetensors (pickle checkpoints cannot be read lazily); pass model_path pointing "
                    "to the folder or file of the model's safetensors."
                )
        elif not path.is_file():
            raise FileNotFoundError(f"model_path {str(path)!r} does not exist; give a folder or a .safetensors file.")
        self.path = path
        if path.name.endswith(".json"):
            weight_map = json.loads(path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path} has no 'weight_map': not a safetensors index.")
            self.files = {key: path.parent / shard for key, shard in weight_map.items()}
            missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
            if missing:
                raise FileNotFoundError(f"{path} lists shard(s) that do not exist: {missing}.")
        else:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                self.files = dict.fromkeys(f.keys(), path)

    def resolve(self, key: str, base_model_prefix: str | None) -> str:
        """The checkpoint's name for module weight ``key``: as is, or without / with the base model prefix (a
        checkpoint of ``LlamaModel`` for a ``LlamaForCausalLM``, or the reverse)."""
        candidates = [key]
        if base_model_prefix:
            head = base_model_prefix + "."
            candidates.append(key.removeprefix(head) if key.startswith(head) else head + key)
        for name in candidates:
            if name in self.files:
                return name
        raise KeyError(
            f"{' or '.join(map(repr, candidates))} not found in {self.path}: is it the checkpoint of this base model?"
        )

    def shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape, from its file's header (no tensor data is read)."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt", device="cpu") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt", device="cpu") as f:
            return f.get_tensor(name)


def _model_path(base: nn.Module, model_path: str | os.PathLike | None) -> Path:
    if model_path is not None:
        return Path(model_path)
    config = getattr(base, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not name:
        raise ValueError(
            "the base model has no config name_or_path (not a transformers model, or built from a config): pass "
            "model_path, the folder or .safetensors file of its full-precision weights."
        )
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # huggingface_hub raises several types for "not in the local cache" / "not a repo id"
        raise ValueError(
            f"the weights of {name!r} are not on disk (neither a folder nor in the local Hugging Face cache): pass "
            "model_path, the folder or .safetensors file of the full-precision weights."
        ) from exc


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | os.PathLike | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Re-initialise ``adapter_name``'s A and B on every LoRA layer over a 4-bit base with one LoftQ step, so that
    ``dequant(Q) + s B A`` approximates the original weight (see the module docstring).

    Args:
        peft_model: a ``PeftModel`` whose LoRA layers wrap 4-bit bases (lorakit's or bitsandbytes' ``Linear4bit``);
            8-bit and full-precision layers are left alone.
        model_path: folder with ``model.safetensors`` or ``model.safetensors.index.json`` (sharded), or the path of
            one of those files. Default: the base model's ``config.name_or_path`` (a folder, or a Hub id already in
            the local cache).
        adapter_name: the adapter to re-initialise.
        callback: ``callback(peft_model, module_name) -> bool``, called after each layer is replaced
            (``module_name`` as in the base model, e.g. ``model.layers.0.self_attn.q_proj``); ``False`` rolls that
            layer back. E.g. compare the logits with the full-precision model's and keep only improvements.
    """
    from lorakit import quant
    from lorakit.layers import LoraLinear
    from lorakit.variants.init import _set_factors, loftq_factors

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(peft_model, "get_base_model"):
        raise TypeError(f"replace_lora_weights_loftq needs a PeftModel, got {type(peft_model).__name__}.")
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} does not exist; available: {sorted(configs)}.")
    base = peft_model.get_base_model()
    layers = [
        (name, module)
        for name, module in base.named_modules()
        if isinstance(module, LoraLinear)
        and adapter_name in module.adapters
        and quant.is_quantized_linear(module.base_layer)
        and getattr(module.base_layer.weight, "quant_state", None) is not None  # 4-bit (8-bit: no)
    ]
    if not layers:
        raise ValueError(
            f"no LoRA layer of adapter {adapter_name!r} wraps a 4-bit base: replace_lora_weights_loftq is for models "
            "loaded in 4 bits (load_model/quantize_model with load_in_4bit=True, or bitsandbytes); for a "
            "full-precision model use init_lora_weights='loftq'."
        )
    if any(adapter_name in module.merged_adapters for _, module in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before replacing its weights.")
    checkpoint = _Checkpoint(_model_path(base, model_path))
    prefix = getattr(base, "base_model_prefix", None)
    keys = {name: checkpoint.resolve(name + ".weight", prefix) for name, _ in layers}  # all, before any change
    for name, module in layers:  # every shape too, from the headers
        found, expected = checkpoint.shape(keys[name]), (module.base_layer.out_features, module.base_layer.in_features)
        if found != expected:
            raise ValueError(
                f"{keys[name]!r} in the checkpoint has shape {found} but {name!r} is {expected} (out, in): not the "
                "checkpoint of this model."
            )
    for name, module in layers:
        adapter = module.adapters[adapter_name]
        weight = checkpoint.get(keys[name]).to(device=adapter.lora_A.weight.device, dtype=torch.float32)  # (out, in)
        qweight = quant.dequantize_weight(module.base_layer).to(weight.device)  # (out, in) fp32
        lora_a, lora_b = loftq_factors(weight, qweight, adapter.r, adapter.scaling)
        before = _snapshot(adapter) if callback is not None else None
        _set_factors(adapter, lora_a, lora_b)
        adapter.after_init(module)  # e.g. DoRA: the magnitude of the new weight, as after lorakit's inits
        if before is not None and not callback(peft_model, name):
            _restore(adapter, before)


def _snapshot(adapter: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter.named_parameters()}


def _restore(adapter: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for n, p in adapter.named_parameters():
        p.data = saved[n]
