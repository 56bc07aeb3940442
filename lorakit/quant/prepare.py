"""``prepare_model_for_kbit_training``: PEFT's contract, with a smaller fp32 footprint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a quantized (or any) model ready for LoRA training; returns the same model.

    Like PEFT's function of the same name:

    1. freeze every parameter;
    2. cast half-precision (fp16 / bf16) parameters to fp32 for numerical stability;
    3. if the model is loaded in 4/8 bit and ``use_gradient_checkpointing``: enable gradient (activation)
       checkpointing with ``gradient_checkpointing_kwargs`` (``use_reentrant`` defaults to True, torch's
       default, passed explicitly), and unless ``use_reentrant=False`` make the input embeddings' output
       require grad (reentrant checkpointing needs an input that does).

    Difference from PEFT in step 2: only 1-D parameters are cast (norm weights and biases: what training
    needs in fp32 and what is small). Embeddings, ``lm_head`` and other matrices that were left unquantized
    keep their dtype; PEFT casts them too, which on a 1B-8B model adds 0.5-2 GB (vocab x hidden x 2 bytes per
    matrix). Quantized weights (``Params4bit``, int8) are never cast. Since the fp32 norms then feed a
    half-precision ``lm_head``, a forward pre-hook casts its input to its weight dtype (logits come out in that
    dtype; transformers' loss upcasts them to fp32).
    """
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dim() == 1 and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float16, torch.bfloat16):
        head.register_forward_pre_hook(_cast_input_to_weight_dtype)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    loaded_in_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if loaded_in_kbit and use_gradient_checkpointing:
        kwargs.setdefault("use_reentrant", True)  # torch's default, passed explicitly (torch warns otherwise)
        if kwargs["use_reentrant"]:
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(_output_requires_grad)
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def _cast_input_to_weight_dtype(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.to(module.weight.dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)
