"""A frozen 4-bit (NF4 / FP4) linear layer whose state dict matches bitsandbytes' ``Linear4bit``.

    y = x @ dequantize_4bit(W_packed).T + b        (dequantized to the compute dtype, then one matmul)

QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314. The packed weight is a ``Params4bit``
(``requires_grad=False``); gradients flow to the input only. The backward pass dequantizes the weight again
instead of saving it (``lorakit.quant.matmul``), so training does not keep a full-precision copy per layer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from lorakit.quant.matmul import DequantLinearModule
from lorakit.quant.nf4 import QuantState, dequantize_4bit, quantize_4bit, zeros_4bit

_QUANT_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Params4bit(nn.Parameter):
    """Packed 4-bit weight ``(ceil(n / 2) / itemsize, 1)`` with its :class:`QuantState` (always frozen).

    The class name and the ``quant_storage`` attribute matter: parameter counters (PEFT's and lorakit's) count
    a ``Params4bit`` as ``numel * 2 * quant_storage.itemsize`` parameters.
    """

    quant_state: QuantState
    quant_storage: torch.dtype

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> Params4bit:
        if requires_grad:
            raise ValueError("Params4bit is frozen: requires_grad must be False (train LoRA adapters instead)")
        self = torch.Tensor._make_subclass(cls, torch.empty(0) if data is None else data, False)
        self.quant_state = quant_state  # type: ignore[assignment]
        self.quant_storage = quant_storage
        return self

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def compress_statistics(self) -> bool:
        return self.quant_state.nested

    def __deepcopy__(self, memo: dict) -> Params4bit:
        return type(self)(self.data.clone(), False, copy.deepcopy(self.quant_state, memo), self.quant_storage)

    def __reduce_ex__(self, proto: int):  # pickling (torch.save of a whole module) keeps the quant state
        return (_rebuild_params4bit, (self.data, self.quant_state, self.quant_storage))

    def __repr__(self) -> str:
        qs = self.quant_state
        return f"Params4bit({qs.quant_type}, shape={tuple(qs.shape)}, blocksize={qs.blocksize}, nested={qs.nested})"


def _rebuild_params4bit(data: torch.Tensor, quant_state: QuantState, quant_storage: torch.dtype) -> Params4bit:
    return Params4bit(data, False, quant_state, quant_storage)


class Linear4bit(DequantLinearModule):
    """Frozen 4-bit linear layer: ``weight`` is a :class:`Params4bit`, ``bias`` a normal parameter.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: whether the layer has a bias (kept in full precision).
        compute_dtype: dtype of the dequantized weight and of the matmul; None = the input's dtype.
        quant_type, blocksize, compress_statistics, quant_storage: see :func:`lorakit.quant.quantize_4bit`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_storage = quant_storage
        packed, state = zeros_4bit(
            (out_features, in_features), blocksize, quant_type, compress_statistics, quant_storage, device=device
        )
        self.weight = Params4bit(packed, False, state, quant_storage)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        quant_storage: torch.dtype = torch.uint8,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear``'s weight (in its own dtype, as transformers does) into a new layer."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.compute_dtype = compute_dtype
        layer.quant_type, layer.blocksize = quant_type, blocksize
        layer.compress_statistics, layer.quant_storage = compress_statistics, quant_storage
        layer.set_weight(linear.weight.detach())
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight by ``weight`` (out, in) quantized with this layer's settings. In the exposed form
        (:meth:`expose_quant_state`) the packed bytes and scales are new parameters of that form (so not on a layer
        FSDP already shards: there the caller copies them into the shards)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match (out_features, in_features) = "
                f"{(self.out_features, self.in_features)}"
            )
        packed, state = quantize_4bit(
            weight, self.blocksize, self.quant_type, self.compress_statistics, self.quant_storage
        )
        exposed = self.__dict__.pop("_exposed_state", None) is not None
        if exposed:
            for name in ("weight_absmax", "weight_nested_absmax"):
                self._parameters.pop(name, None)
        self.weight = Params4bit(packed, False, state, self.quant_storage)
        if exposed:
            self.expose_quant_state()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight ``(out_features, in_features)``."""
        return dequantize_4bit(self.weight, self.weight_quant_state(), dtype=dtype)

    def weight_quant_state(self) -> QuantState:
        """The weight's :class:`QuantState`: ``weight.quant_state``, or after :meth:`expose_quant_state` one
        rebuilt from the parameters ``weight_absmax`` (/ ``weight_nested_absmax``) and the constants kept aside."""
        meta: QuantState | None = self.__dict__.get("_exposed_state")
        if meta is None:
            return self.weight.quant_state
        absmax = self.weight_absmax
        absmax = absmax if meta.nested else absmax.view(torch.float32)  # fp32 bits held as int32, see below
        if not meta.nested:
            return dataclasses.replace(meta, absmax=absmax)
        nested = dataclasses.replace(meta.state2, absmax=self.weight_nested_absmax.view(torch.float32))
        return dataclasses.replace(meta, absmax=absmax, state2=nested)

    @property
    def quant_state_exposed(self) -> bool:
        """Whether :meth:`expose_quant_state` ran (the per-block state is held in parameters)."""
        return "_exposed_state" in self.__dict__

    def expose_quant_state(self) -> None:
        """Hold the packed weight and the per-block quant state as plain frozen parameters, for FSDP.

        FSDP2 (``fully_shard``) replaces every parameter by a sharded one of the base ``Parameter`` class, which
        drops ``Params4bit.quant_state``. Here the packed bytes stay ``weight`` (in ``quant_storage``) and the
        per-block scales become ``weight_absmax`` (``weight_nested_absmax`` under double quantization), so each
        rank shards both on dim 0 and they are all-gathered together, byte for byte, before each forward. fp32
        scales are held as their int32 bits: FSDP's mixed precision casts floating-point parameters only, so the
        scales stay exact whatever ``param_dtype`` is. The 16-entry code book, the nested code and offset, the
        shape and the blocksize stay on the module (replicated, a few hundred bytes). State dicts of the exposed
        form hold these parameters as they are (lorakit's FSDP checkpoints skip frozen parameters)."""
        if "_exposed_state" in self.__dict__:
            return
        state = self.weight.quant_state
        packed = self.weight.data
        self.__dict__["_exposed_state"] = dataclasses.replace(state, absmax=state.absmax[:0])
        self.weight = nn.Parameter(packed, requires_grad=False)
        absmax = state.absmax if state.nested else state.absmax.view(torch.int32)
        self.weight_absmax = nn.Parameter(absmax, requires_grad=False)  # (nblocks,)
        if state.nested:
            nested = state.state2.absmax.view(torch.int32)  # (ceil(nblocks / 256),)
            self.weight_nested_absmax = nn.Parameter(nested, requires_grad=False)

    def set_exposed_quant_state(self, state: QuantState) -> None:
        """Set the constants of the exposed form from `state` (a quantization of this layer's weight; its
        per-block tensors go into ``weight_absmax`` / ``weight_nested_absmax`` separately)."""
        self.__dict__["_exposed_state"] = dataclasses.replace(state, absmax=state.absmax[:0])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Linear4bit:
        if "_exposed_state" in self.__dict__:  # plain parameters (FSDP moves / materializes them)
            if fn(torch.empty(0, dtype=self.weight.dtype)).dtype != self.weight.dtype:
                raise ValueError(f"a Linear4bit after expose_quant_state keeps its packed bytes in "
                                 f"{self.weight.dtype}: change the model's dtype before exposing (moves are fine)")
            super()._apply(fn, recurse)
            meta = self.__dict__["_exposed_state"]
            device = self.weight.device
            if not self.weight.is_meta and not meta.code.is_meta and meta.code.device != device:
                meta.to(device)
            return self
        # .to(dtype) / .half() must not touch the packed bytes (they may be stored as bf16): move devices only.
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        device = fn(torch.empty(0, device=weight.device)).device
        if device != weight.device:
            weight.data = weight.data.to(device)
            weight.quant_state.to(device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "_exposed_state" in self.__dict__:
            return
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        wkey = f"{prefix}weight"
        quant = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(f"{wkey}.")}
        packed = state_dict.pop(wkey, None)
        super()._load_from_state_dict(  # the bias; the weight is handled here
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        missing_keys[:] = [k for k in missing_keys if k != wkey]
        if packed is None:
            missing_keys.append(wkey)
            return
        if not quant:
            raise ValueError(
                f"{wkey} has no quant state ({', '.join(_QUANT_STATE_KEYS)}, quant_state.bitsandbytes__*); "
                f"to load full-precision weights call set_weight(...) or lorakit.quantize_model"
            )
        state = QuantState.from_dict(quant, device=packed.device)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{wkey} quant state has shape {tuple(state.shape)}, expected {(self.out_features, self.in_features)}"
            )
        self.quant_type, self.blocksize, self.compress_statistics = state.quant_type, state.blocksize, state.nested
        self.quant_storage = packed.dtype
        self.weight = Params4bit(packed.clone(), False, state, packed.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )
