"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): ``training.distributed: fsdp``.

Under DDP every one of the ``P`` processes holds the whole model. FSDP2 (ZeRO-3, Rajbhandari et al. 2020,
https://arxiv.org/abs/1910.02054) shards every parameter on dim 0 across the processes, so per process::

    base weights      Psi_base / P            (frozen: sharded, never gathered whole; 4-bit bases too)
    adapter + grads   2 Psi_lora / P          (fp32)
    Adam moments      2 Psi_lora / P          (fp32)
    + one decoder layer's unsharded weights at a time (all-gathered before its forward / backward, freed after)

Each decoder layer (found from the model: the classes transformers names in ``_no_split_modules``) is one
``fully_shard`` group, untied input embeddings another (with their adapters; in the root's group when a DoRA
adapter on them needs the gathered matrix at init), and the root module holds the rest (final norm, LM head;
all-gathered for the whole step, as the chunked loss reads the head's weight directly). Gradients are
reduce-scattered (averaged over the ``P`` processes, as DDP's all-reduce), so the loop's loss normalization is
unchanged. With ``training.bf16`` parameters are all-gathered in bf16 and gradients reduced in fp32
(``MixedPrecisionPolicy``), on a GPU or on CPU (gloo); the sharded parameters and AdamW state stay fp32.

Loading (``ShardedModel.load``): the model is built on the meta device, sharded, then each process allocates and
reads only its rows of each tensor from the safetensors files (a 4-bit layer: the full-precision tensor is read
and quantized one tensor at a time, or a 4-bit folder's stored bytes and scales are read as they are, and the
process keeps its rows of the packed bytes and of the scales), so a node's host memory holds about one copy of
the model, not one per process. Adapters get the values a one-process run would give them (PEFT's init drawn
from the same seed, in the same order; a saved adapter's tensors); an init that reads the base weight (DoRA's
magnitude, PiSSA / OLoRA) runs once per sharded group on a copy of its gathered parameters
(``ShardedModel.after_init``). A ``modules_to_save`` copy and its frozen original read the original tensor.

Calls that are not the root's ``forward`` (``generate`` for exact match, DPO's reference log-probs) go through the
loss module, where they are registered as FSDP forward methods; work split over processes (each its share of
prompts or rows, every process running the same number of collective forwards) is `map_in_lockstep`.

Saving: the adapter's tensors are all-gathered (only those) and rank 0 writes PEFT's layout; checkpoints hold
the sharded trainable tensors and optimizer state (``torch.distributed.checkpoint``, frozen base weights
skipped) and resume with the same number of processes (another is refused by ``lorakit.train.plan``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint folder inside a checkpoint
FORWARD_METHODS = ("generate", "logps", "reference_logps")
"""Methods of a loss module (`lorakit.train.method.LossModule`) that call the model outside ``forward``: FSDP2
runs them under the root's pre/post-forward hooks (``register_fsdp_forward_method``), so the root's own
parameters are gathered and its lazy set-up happens on whichever comes first."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules each wrapped by one ``fully_shard``: instances of the classes that transformers'
    ``_no_split_modules`` names (outermost only), else the children of the longest ``nn.ModuleList`` whose
    children share one class (the layer stack of a model without that attribute)."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    layers: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names or _fsdp_base_name(module) in names:
            layers.append(module)
            inside |= {id(m) for m in module.modules()}
    if layers:
        return layers
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
              and len({type(c) for c in m}) == 1]
    if not stacks:
        raise ValueError(f"training.distributed=fsdp: found no decoder layers in {type(model).__name__} (no "
                         "_no_split_modules and no nn.ModuleList of layers); use training.distributed=ddp")
    return list(max(stacks, key=len))


def _fsdp_base_name(module: nn.Module) -> str:
    """The class name before ``fully_shard`` prefixed it with FSDP (``FSDPLlamaDecoderLayer``)."""
    name = type(module).__name__
    return name[4:] if name.startswith("FSDP") else name


def map_in_lockstep(n_items: int, batch_size: int, run: Callable[[list[int]], dict[int, Any]], collective: bool,
                    device: torch.device) -> dict[int, Any]:
    """``{item: value}`` for items ``0 .. n_items - 1``, computed by `run` on batches of item indices.

    Alone: every item, in order. With `collective` (FSDP, where every forward is collective) process r takes
    items r, r + P, ...; every process calls `run` as many times as the busiest one, with an empty list once it
    is out of items (`run` must still run its forward, on filler input, and return nothing); the values of all
    processes are all-gathered, so every process returns all of them.
    """
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    mine = list(range(rank, n_items, world))
    n_batches = math.ceil(len(mine) / batch_size)
    if collective:
        count = torch.tensor([n_batches], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n_batches = int(count)
    values: dict[int, Any] = {}
    for i in range(n_batches):
        values.update(run(mine[i * batch_size : (i + 1) * batch_size]))
    if collective:
        parts: list[dict[int, Any]] = [{} for _ in range(world)]
        dist.all_gather_object(parts, values)
        values = {j: v for part in parts for j, v in part.items()}
    return values


def mixed_precision_policy(bf16: bool) -> Any:
    """bf16 all-gathers and fp32 gradient reduction with training.bf16 (any device); no casts otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def empty_base_model(name_or_path: str, torch_dtype: str, quantization: Any, attn_implementation: str | None,
                     revision: str | None, trust_remote_code: bool) -> tuple[nn.Module, Any, Path, torch.dtype]:
    """The base model with its parameters on the meta device (buffers real), 4-bit linears in place for a
    quantized run; returns ``(model, tokenizer, local folder, the dtype tensors are loaded in)``."""
    from transformers import AutoConfig, AutoTokenizer

    from lorakit.quant.load import _empty_model, _replace_linears, _resolve, _resolve_dtype, stored_quantization
    from lorakit.train.evaluate import DTYPES, bnb_config, model_path_errors

    with model_path_errors(name_or_path):
        path = _resolve(name_or_path, revision)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # as load_base_model: pad with EOS (padding never takes loss)
        tokenizer.pad_token = tokenizer.eos_token
    requested = bnb_config(quantization) if quantization.method != "none" else None
    qconfig, prequantized = stored_quantization(config, requested, path)  # a quantized folder: as stored
    dtype = _resolve_dtype(None if torch_dtype == "auto" else DTYPES[torch_dtype], config)
    model = _empty_model(config, dtype, attn_implementation, trust_remote_code)
    model.tie_weights()  # a tied LM head is the input embeddings' parameter (read once from the file)
    if qconfig is not None and (qconfig.load_in_4bit or qconfig.load_in_8bit):
        if qconfig.load_in_8bit:
            what = "an 8-bit model folder" if prequantized else "quantization=int8"
            raise NotImplementedError(f"training.distributed=fsdp with {what} (8-bit bases are not sharded); use "
                                      "quantization=nf4 / fp4 on a full-precision model, or "
                                      "training.distributed=ddp")
        if prequantized and requested is None:  # the loop prepares a quantized base only when asked to
            raise ValueError(f"{name_or_path} is already quantized ({qconfig.bnb_4bit_quant_type}): set "
                             f"quantization.method: {qconfig.bnb_4bit_quant_type} in the config (the folder's own "
                             "quantization settings are used)")
        _replace_linears(model, qconfig, device="meta")
        model.config.quantization_config = qconfig.to_dict()
        model.is_loaded_in_4bit = model.is_quantized = True
    return model, tokenizer, path, dtype


def adapter_init_values(model: nn.Module, config: Any,
                        saved: str | Path | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Initial values of every adapter of `model` (created on meta) for `config` (its ``LoraConfig``): drawn as a
    one-process run draws them, ``reset_parameters(init_lora_weights)`` of each adapter in module order from the
    current RNG (loading the base draws nothing), each followed by its init method when that only draws (orthogonal;
    one that reads the base, PiSSA / OLoRA, runs later in ``ShardedModel.after_init``); or, with `saved` (an adapter
    folder, ``model.adapter_name_or_path``), its tensors, copied by the same code as ``PeftModel.load_adapter``.
    Returns ``{id(adapter): {parameter name: value}}``; the adapters stay on meta."""
    from lorakit.config import init_method
    from lorakit.inject import run_init_method
    from lorakit.io.adapter import load_adapter_weights, set_peft_model_state_dict
    from lorakit.layers import LoraAdapter, LoraEmbeddingAdapter

    init_lora_weights = config.init_lora_weights
    if init_method(init_lora_weights).function is not None:  # a method: the adapter's own init first (True), as
        init_lora_weights = True  # in a one-process injection
    adapters = []
    for path, wrapper in model.named_modules():
        for adapter in getattr(wrapper, "adapters", {}).values():
            if not isinstance(adapter, (LoraAdapter, LoraEmbeddingAdapter)):
                continue
            adapter.to_empty(device="cpu")
            if saved is None:
                adapter.reset_parameters(init_lora_weights)
                if not _init_changes_base(config):
                    run_init_method(wrapper, adapter, config, path)  # its draws right after the adapter's own
            adapters.append(adapter)
    if saved is not None:
        set_peft_model_state_dict(model, load_adapter_weights(str(saved)), model.active_adapter)
    values = {id(m): {n: p.detach().clone() for n, p in m.named_parameters()} for m in adapters}
    for module in adapters:
        module.to("meta")
    return values


class ShardedModel:
    """A model trained under FSDP2: shards it, loads its rows of the weights, and saves / restores it.

    ``root`` is the module the loop calls (the loss module around the ``PeftModel`` `peft`); ``base`` the model
    inside `peft` whose parameter names match the checkpoint's.
    """

    def __init__(self, root: nn.Module, peft: nn.Module, mp_policy: Any) -> None:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        self.root, self.peft = root, peft
        self.rank = dist.get_rank()
        base = peft.get_base_model()
        cast = mp_policy.param_dtype
        for module in base.modules():
            if hasattr(module, "expose_quant_state"):  # Linear4bit: scales become parameters, sharded too
                storage = module.quant_storage
                if cast is not None and storage.is_floating_point and storage != cast:  # FSDP would cast the bytes
                    raise ValueError(f"quantization.bnb_4bit_quant_storage={str(storage).removeprefix('torch.')} "
                                     f"with training.bf16 under FSDP: the packed bytes would be cast to {cast}; "
                                     "set bnb_4bit_quant_storage: bfloat16 (or uint8)")
                module.expose_quant_state()
        for layer in decoder_layers(base):
            fully_shard(layer, mp_policy=mp_policy)
        embed = base.get_input_embeddings()
        uses = sum(p is embed.weight for _, p in root.named_parameters(remove_duplicate=False))
        # untied (also from a modules_to_save head's frozen original): the embeddings gather alone -- unless an
        # adapter on them has an init that reads the base (DoRA): `after_init` copies its wrapper, and FSDP2
        # cannot deep-copy a module that is a sharded group itself, so they stay in the root's group
        changes_base = any(_init_changes_base(c) for c in peft.peft_config.values())
        if uses == 1 and not _init_reads_base(embed, changes_base):
            fully_shard(embed, mp_policy=mp_policy)
        fully_shard(root, mp_policy=mp_policy)  # the rest: final norm, LM head (the chunked loss reads its weight)
        for name in FORWARD_METHODS:  # model calls made through the root run under its hooks, as forward does
            if callable(getattr(root, name, None)):
                register_fsdp_forward_method(root, name)

    # ---- loading -------------------------------------------------------------------------------------------
    def load(self, path: str | Path, dtype: torch.dtype, adapters: dict[int, dict[str, torch.Tensor]],
             device: torch.device) -> None:
        """Allocate this process's shards on `device` and fill them: base rows from the safetensors files in
        `path` (cast to `dtype`, then to the parameter's dtype, as a one-process load and
        prepare_model_for_kbit_training do), adapter rows from `adapters` (`adapter_init_values`)."""
        buffers = {n: b.detach().clone() for n, b in self.root.named_buffers()}  # to_empty leaves them empty
        self.root.to_empty(device=device)
        with torch.no_grad():
            for name, buf in self.root.named_buffers():
                buf.copy_(buffers[name])
        files = SafetensorsRows(Path(path))
        base = self.peft.get_base_model()
        tied = _tied_head_key(base)
        prefix = next(n for n, m in self.root.named_modules() if m is base)
        prefix = f"{prefix}." if prefix else ""
        owners = {id(p): (m, n) for m in self.root.modules() for n, p in m.named_parameters(recurse=False)}
        adapter_of = {id(p): (adapters[id(m)], n) for m in self.root.modules() if id(m) in adapters
                      for n, p in m.named_parameters()}
        done: set[int] = set()
        for fqn, param in self.root.named_parameters(remove_duplicate=False):
            if id(param) in done:
                continue
            if id(param) in adapter_of:
                values, name = adapter_of[id(param)]
                _fill(param, values[name])
                done.add(id(param))
                continue
            module, pname = owners[id(param)]
            key = checkpoint_key(fqn[len(prefix):]) if fqn.startswith(prefix) else fqn
            if hasattr(module, "expose_quant_state"):
                if pname == "weight":  # the whole tensor quantized (or as stored), this process's rows kept
                    self._load_4bit(module, key, files, dtype)
                    done |= {id(p) for p in module.parameters(recurse=False) if p is not module.bias}
                if pname != "bias":
                    continue  # weight_absmax / weight_nested_absmax: filled with the weight
            start, length = _rows(param)
            value = files.read(key, start, start + length)
            if value is None and key in tied:  # a tied head, wrapped (modules_to_save): read the embeddings
                value = files.read(tied[key], start, start + length)
            if value is None:
                continue  # e.g. a tied lm_head.weight, loaded under its other name
            if value.is_floating_point():
                value = value.to(dtype)
            with torch.no_grad():
                _local(param).copy_(value.reshape(_local(param).shape))
            del value
            done.add(id(param))
        missing = [n for n, p in self.root.named_parameters() if id(p) not in done]
        if missing:
            raise ValueError(f"weights missing from the checkpoint in {path}: {missing[:8]}")

    def after_init(self, config: Any) -> None:
        """The parts of a new adapter's init that read the base weight, run on each sharded group's gathered
        parameters: the ``INITS`` method of `config` (a ``LoraConfig``) when it has one (PiSSA, OLoRA: factors
        from W, the base keeping ``W - s B A``) and the adapter's ``after_init`` (DoRA's magnitude
        ``m = ||W + s B A||_c``). Each runs on a copy of its layer (FSDP's gathered tensors are not written), and
        every process keeps its rows of what changed, base rows included. Every process calls it, after `load`."""
        from torch.distributed.fsdp import FSDPModule

        from lorakit.inject import run_init

        changes_base = _init_changes_base(config)
        # the sharded groups: each decoder layer, untied input embeddings, and the root holding the rest
        inner = [m for m in self.root.modules() if isinstance(m, FSDPModule) and m is not self.root]
        in_inner = {id(m) for group in inner for m in group.modules()}
        groups = [(group, list(group.named_modules())) for group in inner]
        groups.append((self.root, [(n, m) for n, m in self.root.named_modules() if id(m) not in in_inner]))
        for group, members in groups:
            targets = [(path, wrapper, name) for path, wrapper in members
                       for name, adapter in getattr(wrapper, "adapters", {}).items()
                       if changes_base or _reads_base(adapter)]
            if not targets:  # the same on every process: the model is built the same way everywhere
                continue
            group.unshard()  # (FSDP2: not recursive; each group gathers its own parameters)
            written = []
            for path, wrapper, name in targets:
                layer = copy.deepcopy(wrapper)  # plain tensors holding the gathered values
                if changes_base:
                    run_init(layer, layer.adapters[name], config, path)  # the method, then after_init
                else:
                    layer.adapters[name].after_init(layer)
                states = {n: m.weight_quant_state() for n, m in layer.named_modules()
                          if getattr(m, "quant_state_exposed", False)}
                written.append((wrapper, {n: t.detach() for n, t in layer.named_parameters()}, states))
            group.reshard()
            for wrapper, full, copies in written:
                for name, param in wrapper.named_parameters():
                    _fill(param, full[name])
                for name, module in wrapper.named_modules():  # a re-quantized 4-bit residual (PiSSA / OLoRA):
                    if name in copies:  # its new constants (the nested offset) go with its new scales
                        module.set_exposed_quant_state(copies[name])

    def _load_4bit(self, module: nn.Module, key: str, files: SafetensorsRows, dtype: torch.dtype) -> None:
        """Fill `module`'s shards of the packed weight and scales: the weight `key` quantized, or, in a folder
        already quantized, its packed bytes (viewed as the module's storage dtype) and stored quant state."""
        from lorakit.quant.load import _release_free_memory
        from lorakit.quant.nf4 import QuantState, quantize_4bit

        weight = files.read(key)
        if weight is None:
            raise ValueError(f"weights missing from the checkpoint: {key}")
        pieces = {name: files.read(name) for name in files.tensors if name.startswith(f"{key}.")}
        if pieces:  # already quantized: weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__*, ...
            state = QuantState.from_dict(pieces)
            stored = (state.quant_type, state.blocksize, state.nested)
            if stored != (module.quant_type, module.blocksize, module.compress_statistics):
                raise ValueError(f"{key}: quantized as {stored} (quant_type, blocksize, double quantization), but "
                                 "the folder's quantization_config says "
                                 f"{(module.quant_type, module.blocksize, module.compress_statistics)}")
            packed = weight.reshape(-1).view(torch.uint8).view(module.quant_storage).reshape(-1, 1)
        else:
            packed, state = quantize_4bit(weight.to(dtype), module.blocksize, module.quant_type,
                                          module.compress_statistics, module.quant_storage)
        del weight
        _release_free_memory()  # the full-precision tensor and quantization temporaries (lorakit.quant.load)
        _fill(module.weight, packed)
        _fill(module.weight_absmax, state.absmax if state.nested else state.absmax.view(torch.int32))
        if state.nested:
            _fill(module.weight_nested_absmax, state.state2.absmax.view(torch.int32))
        device = _local(module.weight).device
        module.set_exposed_quant_state(state.to(device))

    # ---- training ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient reduce-scatter (gradient accumulation: all but the last micro-batch)."""
        if not enabled:
            yield
            return
        self.root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)

    @staticmethod
    def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over sharded gradients: the global norm (the sum of squares over
        every shard, all-reduced), then each shard scaled by ``min(1, max_norm / (norm + 1e-6))``."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ---- saving --------------------------------------------------------------------------------------------
    def save_adapter(self, folder: str | Path) -> None:
        """Write the adapter in PEFT's layout into `folder` (rank 0 writes; every process must call)."""
        state = gather_adapter_state(self.peft)
        if self.rank == 0:
            self.peft.save_pretrained(folder, state_dict=state)

    def _state_dicts(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.root, _unwrap(optimizer),
                                      options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optim": optim}

    def save_state(self, folder: Path, optimizer: Any) -> None:
        """This process's shards of the trainable tensors and optimizer state into ``folder/sharded``."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state_dicts(optimizer), checkpoint_id=folder / SHARDED_DIR)

    def load_state(self, folder: Path, optimizer: Any) -> None:
        """Inverse of `save_state` (same number of processes; checked before by the run's plan)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if not (folder / SHARDED_DIR).is_dir():
            raise ValueError(f"cannot resume from {folder}: it has no {SHARDED_DIR}/ folder (it was not written "
                             "by a training.distributed=fsdp run); resume with the config of that run")
        state = self._state_dicts(optimizer)
        dcp.load(state, checkpoint_id=folder / SHARDED_DIR)
        # strict=False: the frozen base is not in the checkpoint (dcp.load above fails on a missing trainable key)
        set_state_dict(self.root, _unwrap(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))


def save_trainable_state(module: nn.Module, folder: str | Path) -> None:
    """This process's shards of `module`'s trainable tensors into `folder` (``torch.distributed.checkpoint``, under
    the key ``"model"`` as accelerate writes it); the frozen base is skipped. Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": state}, checkpoint_id=folder)


def load_trainable_state(module: nn.Module, folder: str | Path) -> None:
    """Inverse of `save_trainable_state` (the same number of processes); a checkpoint that holds the frozen tensors
    too (accelerate's whole-model format) loads as well: only the trainable ones are read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(module, options=options)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(module, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _init_changes_base(config: Any) -> bool:
    """Whether a ``LoraConfig``'s ``init_lora_weights`` is a method that reads and changes the base weight (PiSSA,
    OLoRA: factors from W, the base keeping W - s B A)."""
    from lorakit.config import init_method

    method = init_method(config.init_lora_weights)
    return method.function is not None and method.changes_base


def _reads_base(adapter: nn.Module) -> bool:
    """Whether the adapter's own ``after_init`` reads its base weight (DoRA's magnitude)."""
    from lorakit.adapter import Adapter

    return type(adapter).after_init is not Adapter.after_init


def _init_reads_base(wrapper: nn.Module, changes_base: bool) -> bool:
    """Whether a new adapter of `wrapper` runs an init on the base weight (``ShardedModel.after_init``);
    `changes_base`: the config's init method is one that does (`_init_changes_base`)."""
    adapters = getattr(wrapper, "adapters", {})
    return bool(adapters) and (changes_base or any(_reads_base(a) for a in adapters.values()))


def gather_adapter_state(peft: nn.Module) -> dict[str, torch.Tensor]:
    """The whole tensors a lorakit ``PeftModel``'s adapter files hold, keyed as in its state dict, for
    ``peft.save_pretrained(folder, state_dict=...)``. Under FSDP every process must call this: each adapter tensor
    is all-gathered (``DTensor.full_tensor``), the frozen base weights are not; unsharded tensors are returned as
    they are (on CPU)."""
    from lorakit.io.adapter import adapter_key_map, saved_embedding_keys

    keys: set[str] = set()
    for name, config in peft.peft_config.items():
        keys |= set(adapter_key_map(peft, name, config.bias).values())
        keys |= set(saved_embedding_keys(peft, config, "auto").values())
    state = peft.state_dict(keep_vars=True)
    return {k: _full(state[k]).detach().cpu() for k in sorted(keys)}


def _tied_head_key(base: nn.Module) -> dict[str, str]:
    """``{output embedding key: input embedding key}`` for a model that ties them (the file holds the input one),
    else empty."""
    if not getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in base.named_modules()}
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or id(head) not in names or id(embed) not in names:
        return {}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


def checkpoint_key(name: str) -> str:
    """The base model's checkpoint key of parameter `name` of the LoRA-wrapped base: a wrapped layer's
    ``base_layer``, and both the frozen original and the trainable copy of a ``modules_to_save`` module, read the
    original tensor (``lm_head.modules_to_save.default.weight`` -> ``lm_head.weight``)."""
    return re.sub(r"\.(base_layer|original_module|modules_to_save\.[^.]+)\.", ".", name)


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _rows(param: torch.Tensor) -> tuple[int, int]:
    """(first row, row count) of this process's shard of a dim-0-sharded parameter (torch.chunk's split)."""
    import torch.distributed as dist

    local = _local(param)
    if local is param or param.dim() == 0:
        return 0, param.shape[0] if param.dim() else 0
    size = -(-param.shape[0] // dist.get_world_size())
    return min(dist.get_rank() * size, param.shape[0]), local.shape[0]


def _fill(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this process's rows of the whole tensor `full` into its shard of `param`."""
    start, length = _rows(param)
    with torch.no_grad():
        _local(param).copy_(full[start : start + length])


class SafetensorsRows:
    """Reads rows ``[start, stop)`` of the tensors of a model folder's safetensors files with plain reads (no
    mmap: nothing stays mapped). Rows of a row-major tensor are one contiguous byte range of the file."""

    def __init__(self, path: Path) -> None:
        import json

        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({str(path / v) for v in json.loads(index.read_text())["weight_map"].values()})
        elif (path / "model.safetensors").is_file():
            files = [str(path / "model.safetensors")]
        else:
            raise FileNotFoundError(f"training.distributed=fsdp loads safetensors files: no model.safetensors or "
                                    f"model.safetensors.index.json in {path}")
        self.tensors: dict[str, tuple[str, int, dict[str, Any]]] = {}
        for file in files:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.tensors[name] = (file, 8 + header_len, info)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """Rows ``[start, stop)`` (all rows: stop None) of tensor `name`, or None if no file holds it."""
        from lorakit.quant.load import _ST_DTYPES

        if name not in self.tensors:
            return None
        file, base, info = self.tensors[name]
        shape, dtype = list(info["shape"]), _ST_DTYPES[info["dtype"]]
        if not shape:
            start, stop, row_shape = 0, 1, []
        else:
            stop = shape[0] if stop is None else stop
            row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        buf = bytearray((stop - start) * row_bytes)
        with open(file, "rb") as f:
            f.seek(base + info["data_offsets"][0] + start * row_bytes)
            f.readinto(buf)
        out = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return out.reshape(shape if not shape else [stop - start, *row_shape])
