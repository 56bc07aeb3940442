"""Which forward path a LoRA layer takes (fused / mixed / plain), and the context that carries a mixed batch.

``choose_path`` is the one place the rules live; ``LoraLinear.forward`` and the fused SwiGLU MLP
(``lorakit.fused``) both ask it. A mixed batch (``PeftModel.forward/generate(..., adapter_names=...)``) reaches
the wrappers through the context variable ``MIXED_BATCH`` for the duration of the call (``mixed_batch_context``):
nothing is written into the wrappers.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad

from lorakit.quant.matmul import DequantLinearModule

#: The running call's mixed batch (``lorakit.variants.mixed.MixedBatch``), or None: every row runs the active
#: adapters.
MIXED_BATCH: contextvars.ContextVar[Any] = contextvars.ContextVar("lorakit_mixed_batch", default=None)

MIXED, FUSED, PLAIN = "mixed", "fused", "plain"


@contextlib.contextmanager
def mixed_batch_context(batch: Any) -> Iterator[None]:
    """``batch`` is the current mixed batch inside the block (restored after, also on error)."""
    token = MIXED_BATCH.set(batch)
    try:
        yield
    finally:
        MIXED_BATCH.reset(token)


def has_hooks(module: nn.Module) -> bool:
    """Whether running ``module``'s computation without calling it would skip a hook: its own forward/backward
    hooks, an instance-level ``forward`` (accelerate's ``_hf_hook`` wrappers), or a global module hook."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    if "forward" in module.__dict__ or hasattr(module, "_hf_hook"):
        return True
    g = torch.nn.modules.module
    return bool(
        g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


def _fuses_by_default(wrapper: nn.Module, x: torch.Tensor, adapter: nn.Module) -> bool:
    """Where the fused path computes what the plain path computes, value for value, so that switching between them
    changes nothing (reentrant checkpointing runs the forward without gradients, on the plain path, and recomputes
    it with them, on the fused one): fp32/fp64 compute with x, the adapter and the base weight in one such dtype
    and no autocast (in half precision the fused additions round once where the plain path rounds twice); a plain
    ``nn.Linear`` / GPT-2 ``Conv1D`` or a lorakit quantized base computing in x's dtype; no ``torch.compile``
    tracing, ``torch.func`` transform or forward-mode AD (the autograd function has no vmap or jvp rule)."""
    base = wrapper.base_layer
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64) or adapter.dtype != dtype:
        return False
    if isinstance(base, DequantLinearModule):
        if base.compute_dtype not in (None, dtype):
            return False
    elif not (type(base) is nn.Linear or type(base).__name__ == "Conv1D") or base.weight.dtype != dtype:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return not (
        torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    )


def choose_path(
    wrapper: nn.Module, x: torch.Tensor, adapters: list[nn.Module], extra_args: bool, mlp: bool = False
) -> str:
    """The forward path of ``wrapper`` (a ``LoraLinear``) for input ``x`` with ``adapters`` to run (active, not
    merged, not disabled); ``extra_args``: the call passes more than ``x`` to the base layer; ``mlp``: asked for
    a projection of the fused SwiGLU MLP (``lorakit.fused``). The first rule that applies decides:

    | # | condition                                                                          | path  |
    |---|------------------------------------------------------------------------------------|-------|
    | 1 | a mixed batch is running (``MIXED_BATCH``) and adapters are not disabled            | mixed |
    | 2 | ``use_fused is False`` (``enable_fused_lora(False)``)                               | plain |
    | 3 | ``use_fused is None`` (default) and gradients off (inference: lower per-call cost)  | plain |
    | 4 | extra arguments to the base layer; not exactly one adapter (MLP: at most one)      | plain |
    | 5 | hooks on the base layer (the fused path never calls it: accelerate's offload hooks) | plain |
    | 6 | base weight or bias trainable; base neither quantized (lorakit) nor a float weight; | plain |
    |   | MLP: a base other than ``nn.Linear`` / quantized, or ``fan_in_fan_out``             |       |
    | 7 | ``use_fused is None`` and the fused path would not equal the plain one              | plain |
    |   | (``_fuses_by_default``: dtype, autocast, base type, compile / torch.func / fwd AD)  |       |
    | 8 | otherwise                                                                          | fused |

    "fused" runs ``adapter.fused_forward`` (MLP: ``adapter.projection``); an adapter without a fused form returns
    None there and the plain path runs. "mixed": ``lorakit.variants.mixed``; "plain": the base layer, then each
    adapter's ``apply``."""
    if MIXED_BATCH.get() is not None and not wrapper.disabled:
        return MIXED
    use_fused = wrapper.use_fused
    if use_fused is False or (use_fused is None and not torch.is_grad_enabled()):
        return PLAIN
    if extra_args or len(adapters) > 1 or (not adapters and not mlp):
        return PLAIN
    base = wrapper.base_layer
    if has_hooks(base):
        return PLAIN
    if not frozen_base(base, mlp) or (mlp and wrapper.fan_in_fan_out):
        return PLAIN
    if use_fused is None and adapters and not _fuses_by_default(wrapper, x, adapters[0]):
        return PLAIN
    return FUSED


def frozen_base(base: nn.Module, mlp: bool) -> bool:
    """A base the fused paths can compute without calling it: frozen weight and bias, quantized (lorakit's) or a
    float weight (MLP: exactly ``nn.Linear``)."""
    weight = getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    if weight is None or weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if isinstance(base, DequantLinearModule):
        return True
    return type(base) is nn.Linear if mlp else weight.is_floating_point()


def fused_weight(base: nn.Module, x: torch.Tensor, transposed: bool) -> Any:
    """The frozen base weight (out, in) for a fused path, or a callable that dequantizes it on demand (in forward
    and backward, unsaved)."""
    if isinstance(base, DequantLinearModule):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return lambda: base.dequantize(dtype)
    return base.weight.T if transposed else base.weight
