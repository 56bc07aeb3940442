"""``FastLanguageModel``: Unsloth's loading / LoRA API on lorakit.

``from unsloth import FastLanguageModel`` -> ``from lorakit import FastLanguageModel``; the calls stay as they
are::

    model, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=2048, dtype=None,
                                                         load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=[...], use_gradient_checkpointing="unsloth",
                                             random_state=3407, use_rslora=False, loftq_config=None)
    FastLanguageModel.for_inference(model)  # / for_training(model)

``load_in_4bit`` loads with lorakit's NF4 with double quantization (QLoRA's recipe, https://arxiv.org/abs/2305.14314)
and ``load_in_8bit`` with its int8 layers, quantizing while the weights stream in (``lorakit.load_model``). The
model is a transformers model and ``get_peft_model`` returns a lorakit ``PeftModelForCausalLM``; train it with
``lorakit.integrations.trl.SFTTrainer`` (or transformers' Trainer via ``lorakit.integrations.transformers``).

These are lorakit's layers and kernels, not Unsloth's. Unsloth options lorakit
does not implement raise ``NotImplementedError`` naming the option. ``use_gradient_checkpointing="unsloth"``
(Unsloth's checkpointing with activations offloaded to CPU) runs as ordinary activation checkpointing: the same
gradients, without the offload.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.model import PeftModel

__all__ = ["FastLanguageModel"]

#: Unsloth's default ``target_modules`` (every projection of a Llama-style block).
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _refuse(method: str, options: dict[str, Any]) -> None:
    if options:
        names = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        raise NotImplementedError(f"FastLanguageModel.{method}({names}) is not implemented in lorakit.")


def _default_dtype() -> torch.dtype:
    """Unsloth's ``dtype=None``: bf16 where the GPU supports it, else fp16; fp32 on CPU (no fast half matmul)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _checkpointing(model: nn.Module, use_gradient_checkpointing: bool | str) -> None:
    if use_gradient_checkpointing not in (True, False, "unsloth"):
        raise ValueError(
            f"use_gradient_checkpointing={use_gradient_checkpointing!r} is invalid: use True, False or \"unsloth\"."
        )
    if not use_gradient_checkpointing:
        return
    kwargs = {"use_reentrant": False}  # non-reentrant: no input grad needed, no torch warning
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class FastLanguageModel:
    """Unsloth's ``FastLanguageModel`` entry points (static methods, as in Unsloth)."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike = "unsloth/Llama-3.2-1B-Instruct",
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: str | dict | None = "sequential",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: bool | str = "unsloth",
        revision: str | None = None,
        fast_inference: bool = False,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load ``model_name`` (local folder or Hub id) -> ``(model, tokenizer)``.

        ``dtype`` None: bf16 / fp16 on a GPU (Unsloth's rule), fp32 on CPU; it is also the 4-bit compute dtype.
        ``load_in_4bit``: NF4 + double quantization; ``load_in_8bit``: int8. ``max_seq_length`` is recorded on the
        model (``model.max_seq_length``) and the tokenizer (``model_max_length``); past the model's
        ``max_position_embeddings`` it warns (Unsloth's automatic RoPE scaling is not done). ``device_map``:
        ``"sequential"``, ``"auto"`` or None put the whole model on the GPU if there is one, else the CPU.
        ``use_gradient_checkpointing`` is applied by ``get_peft_model`` (its own argument wins)."""
        from lorakit.quant.config import BitsAndBytesConfig
        from lorakit.quant.load import load_model

        refused = {k: v for k, v in kwargs.items() if v is not None}
        refused |= {k: v for k, v in [("full_finetuning", full_finetuning), ("fast_inference", fast_inference)] if v}
        refused |= {k: v for k, v in [("rope_scaling", rope_scaling), ("token", token)] if v is not None}
        if device_map not in ("sequential", "auto", None):
            refused["device_map"] = device_map
        _refuse("from_pretrained", refused)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or _default_dtype()
        quant = None
        if load_in_4bit or load_in_8bit:
            quant = BitsAndBytesConfig(
                load_in_4bit=load_in_4bit and not load_in_8bit,
                load_in_8bit=load_in_8bit,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(
            model_name, quantization_config=quant, torch_dtype=dtype, device=device, revision=revision,
            trust_remote_code=trust_remote_code,
        )
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_seq_length > limit:
            warnings.warn(
                f"max_seq_length={max_seq_length} is beyond the model's max_position_embeddings={limit}; lorakit "
                "does not apply Unsloth's automatic RoPE scaling, so positions past it are extrapolated.",
                stacklevel=2,
            )
        model.max_seq_length = max_seq_length
        model._lorakit_gradient_checkpointing = use_gradient_checkpointing
        if tokenizer is not None:
            tokenizer.model_max_length = max_seq_length
            if fix_tokenizer and tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: list[int] | int | None = None,
        layers_pattern: str | None = None,
        use_gradient_checkpointing: bool | str | None = None,
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: bool | str = True,
        loftq_config: dict | Any | None = None,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Add LoRA adapters -> a lorakit ``PeftModelForCausalLM``. ``random_state`` seeds the adapters' init
        (``torch.manual_seed``); ``use_gradient_checkpointing`` (default: what ``from_pretrained`` got) True or
        ``"unsloth"`` turns on non-reentrant activation checkpointing; 4/8-bit bases are first prepared with
        ``prepare_model_for_kbit_training`` (frozen, fp32 norms). ``loftq_config`` is used with
        ``init_lora_weights="loftq"``, as in PEFT."""
        from lorakit.quant.prepare import prepare_model_for_kbit_training
        from lorakit.tasks import get_peft_model

        _refuse("get_peft_model", {k: v for k, v in kwargs.items() if v is not None and v is not False})
        if isinstance(model, PeftModel):
            raise ValueError(
                "FastLanguageModel.get_peft_model: the model already has LoRA adapters; pass the model from "
                "FastLanguageModel.from_pretrained (or call merge_and_unload() first)."
            )
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        if use_gradient_checkpointing is None:
            use_gradient_checkpointing = getattr(model, "_lorakit_gradient_checkpointing", "unsloth")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _checkpointing(model, use_gradient_checkpointing)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=DEFAULT_TARGET_MODULES if target_modules is None else target_modules,
            bias=bias,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
            use_rslora=use_rslora,
            use_dora=use_dora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            loftq_config=(loftq_config or {}) if init_lora_weights == "loftq" else {},
            task_type=TaskType.CAUSAL_LM,
        )
        torch.manual_seed(random_state)
        return get_peft_model(model, config)

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Eval mode (no dropout) with the KV cache on; returns the model."""
        model.eval()
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if getattr(base, "config", None) is not None:
            base.config.use_cache = True
        return model

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool = True) -> nn.Module:
        """Train mode again (after ``for_inference``); ``use_gradient_checkpointing`` is kept as it was set;
        returns the model."""
        model.train()
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if getattr(base, "config", None) is not None and use_gradient_checkpointing:
            base.config.use_cache = False  # the cache is useless (and warned about) under checkpointing
        return model
