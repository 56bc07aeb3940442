"""``PeftModel`` and its task classes: PEFT's public LoRA API over lorakit's layers.

Layout, as in PEFT: ``peft_model.base_model`` is a ``LoraModel`` and ``peft_model.base_model.model`` the
transformers model, adapted in place; parameter names read ``base_model.model.<path>``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.config import LoraConfig, PeftType
from lorakit.inject import eject_adapter, mark_bias_trainable
from lorakit.io.adapter import (
    WEIGHTS_NAME,
    WEIGHTS_NAME_BIN,
    check_and_copy,
    check_finite,
    get_adapter_state_dict,
    load_adapter_weights,
    save_adapter_weights,
    saved_embedding_keys,
)
from lorakit.io.files import atomic_directory
from lorakit.io.load import check_reload_compatible, remap_keys, split_load_kwargs
from lorakit.layers import LORA_WRAPPERS, forwarding_getattr, warn_if_in_prefix
from lorakit.lora_model import LoraModel

if TYPE_CHECKING:
    from lorakit.status import TunerLayerStatus, TunerModelStatus
    from lorakit.variants.mixed import AdapterStack


class PeftModel(nn.Module):
    """A transformers (or any torch) model with LoRA adapters; PEFT's ``PeftModel`` API.

    ``autocast_adapter_dtype=True`` keeps adapters in fp32 over half-precision bases (False: the base's dtype).
    ``low_cpu_mem_usage`` is accepted for PEFT compatibility and changes nothing: lorakit allocates adapter
    weights without a throw-away init either way (and on the meta device for meta models).
    """

    #: Read by transformers' Trainer: a quantized model with adapters attached may be fine-tuned.
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        initialize: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}.")
        if peft_config.base_model_name_or_path is None:
            peft_config = copy.deepcopy(peft_config)
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self.base_model = LoraModel(model, peft_config, adapter_name, initialize)
        if not autocast_adapter_dtype:  # adapters in the base weights' dtype instead of fp32
            self._keep_base_dtype(adapter_name)
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings + reentrant checkpointing need an input grad
        if checkpointing:
            from lorakit.variants.mixed import install_checkpoint_rows

            install_checkpoint_rows(model)  # recomputed layers see a mixed call's rows

    __getattr__ = forwarding_getattr("base_model")

    # ---- pass-through -------------------------------------------------------------------------------------
    def forward(
        self, *args: Any, adapter_names: list[str] | None = None, adapter_stack: AdapterStack | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model's forward; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters in a batch,
        with the stacked factors of ``adapter_stack`` (``stack_adapters``) when given, else stacked for the call."""
        with self._mixed_batch(adapter_names, adapter_stack):
            return self.get_base_model()(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: list[str] | None = None, adapter_stack: AdapterStack | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model's ``generate``; ``adapter_names`` / ``adapter_stack`` as in ``forward``."""
        with self._mixed_batch(adapter_names, adapter_stack):
            return self.get_base_model().generate(*args, **kwargs)

    def stack_adapters(self, names: Sequence[str]) -> AdapterStack:
        """The adapters ``names`` stacked for mixed batches (``lorakit.variants.mixed.AdapterStack``), for calls
        with ``adapter_names=rows, adapter_stack=stack`` (rows: names of the stack or ``"__base__"``). The caller
        owns it; it rebuilds itself before a call if any of its adapters' weights changed. Not part of PEFT's API."""
        from lorakit.variants.mixed import AdapterStack

        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(n for n in names if n not in self.peft_config)
        if unknown or not names:
            raise ValueError(
                f"stack_adapters({names!r}): unknown adapters {unknown}; available: {sorted(self.peft_config)}."
            )
        return AdapterStack(self.get_base_model(), names)

    def _mixed_batch(
        self, adapter_names: list[str] | None, adapter_stack: AdapterStack | None
    ) -> contextlib.AbstractContextManager[None]:
        if adapter_names is None:
            if adapter_stack is not None:
                raise ValueError("adapter_stack= is used with adapter_names= (one name of the stack per row).")
            return contextlib.nullcontext()
        from lorakit.variants.mixed import mixed_batch

        return mixed_batch(self.get_base_model(), adapter_names, list(self.peft_config), adapter_stack)

    def get_base_model(self) -> nn.Module:
        """The transformers model (adapted in place)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0] if self.base_model.active_adapters else ""

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    @property
    def peft_type(self) -> PeftType:
        return PeftType.LORA

    @property
    def modules_to_save(self) -> set[str] | None:
        """PEFT's: the ``modules_to_save`` entries of all adapters (task heads included), or None if there are none."""
        names = {m for config in self.peft_config.values() for m in config.modules_to_save or ()}
        return names or None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Enable checkpointing on the base model and make the (frozen) embeddings' output require grad."""
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        from lorakit.variants.mixed import install_checkpoint_rows

        install_checkpoint_rows(base)  # recomputed layers see a mixed call's rows

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
                                        ) -> None:
        """transformers >= 5's name, called by its Trainer: checkpointing on the base model (``kwargs`` such as
        ``every_n_layers`` / ``offload`` passed on) and the (frozen) embeddings' output requiring grad."""
        base = self.get_base_model()
        if not hasattr(base, "activation_checkpointing_enable"):  # transformers 4.x
            return self.gradient_checkpointing_enable(activation_checkpointing_kwargs)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
        from lorakit.variants.mixed import install_checkpoint_rows

        install_checkpoint_rows(base)  # recomputed layers see a mixed call's rows

    def enable_fused_lora(self, enabled: bool = True, mlp: bool = True) -> None:
        """Use the fused LoRA autograd (``lorakit.fused``) everywhere it applies: linear layers with one plain
        active adapter over a frozen base save only x, the dropout mask and x A^T for the backward and dequantize
        4-bit weights on demand; with ``mlp``, Llama-style SwiGLU MLPs run as one fused op that recomputes the
        activation. Not part of PEFT's API; parameter names unchanged.

        Without this call, linear layers already take the fused path in fp32/fp64 training where it computes what
        the plain path computes (see ``LoraLinear.use_fused``). This call extends it to half precision, autocast
        and adapters kept in another dtype than the compute dtype (they then run in the compute dtype, not on an
        fp32 copy of x, so outputs differ from the plain path by rounding) and adds the fused MLPs.
        ``enabled=False``: the plain autograd path everywhere. ``merge_and_unload`` / ``unload`` restore the
        default first."""
        from lorakit.fused import disable_fused, enable_fused

        disable_fused(self.get_base_model(), plain=not enabled)
        if enabled:
            enable_fused(self.get_base_model(), mlp=mlp)

    # ---- parameters ---------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; a packed 4-bit weight counts 2 parameters per byte (PEFT)."""
        trainable = total = 0
        for _, param in self.named_parameters():
            n = param.numel()
            if param.__class__.__name__ == "Params4bit":
                storage = getattr(param, "quant_storage", None)
                n *= 2 * (param.element_size() if storage is None else storage.itemsize)
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Explicitly (un)freeze the named adapters' parameters (nothing else flips them)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """PEFT's: the status of each adapted layer (``lorakit.status.get_layer_status``)."""
        from lorakit.status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """PEFT's: the status of the model's adapters (``lorakit.status.get_model_status``)."""
        from lorakit.status import get_model_status

        return get_model_status(self)

    # ---- adapters -----------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter (trainable unless ``peft_config.inference_mode``); the active adapter is unchanged."""
        if adapter_name not in self.peft_config:  # PEFT: a taken name raises (in inject) without the warning
            warn_if_in_prefix(adapter_name)
        self.base_model.inject(peft_config, adapter_name)
        if not autocast_adapter_dtype:
            self._keep_base_dtype(adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.base_model.set_adapter(adapter_name, inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the base model's exact outputs inside the block."""
        return self.base_model.disable_adapter()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---- files --------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        allow_non_finite: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write PEFT's layout: ``default`` at the root, other adapters in subfolders. The whole folder is replaced
        atomically (``lorakit.io.files.atomic_directory``): a save killed at any point leaves the old folder or the
        new one, never a mix; files in it that the save does not write (other adapters, notes) are kept.

        ``save_embedding_layers`` (PEFT's): also save the input/output embeddings' base weights; ``"auto"`` does when
        ``target_modules`` names ``embed_tokens``/``lm_head`` or the vocabulary was resized. ``state_dict`` (a
        keyword, as transformers' Trainer passes it) replaces the model's own tensors. Weights holding NaN or inf
        (a diverged training run) are refused with a ``ValueError`` unless ``allow_non_finite=True`` (lorakit's;
        PEFT saves them without a word)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file; give a folder path.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} not found; available: {sorted(self.peft_config)}.")
        if not is_main_process:
            return
        full_state = kwargs.pop("state_dict", None)
        if kwargs:  # PEFT takes and ignores them too; say so rather than drop them silently
            warnings.warn(f"save_pretrained(): keyword arguments {sorted(kwargs)} have no effect.", stacklevel=2)
        initial = path_initial_model_for_weight_conversion
        files = []  # (subfolder, config, tensors, auto_mapping) of each adapter, all built before anything is written
        for name in names:
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            embeddings = saved_embedding_keys(self, config, save_embedding_layers)
            state = get_adapter_state_dict(self, name, config.bias, embeddings, full_state)
            if not allow_non_finite:
                check_finite(state, f"adapter {name!r}", "Lower the learning rate (or lora_alpha) and train again, "
                             "or pass save_pretrained(..., allow_non_finite=True) to save it anyway.")
            if initial is not None:  # a plain rank-2r LoRA for the original base (pissa/olora/...)
                from lorakit.variants.init import convert_to_plain_lora, converted_config

                sub = None if name == "default" else name
                state = convert_to_plain_lora(state, load_adapter_weights(os.fspath(initial), subfolder=sub))
                config = converted_config(config)
            base_class = type(self.get_base_model())  # PEFT's auto_mapping, for AutoPeftModel without a task type
            auto_mapping = (
                {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
                if config.task_type is None
                else None
            )
            files.append(("" if name == "default" else name, config, state, auto_mapping))
        stale = tuple(os.path.join(sub, w) for sub, *_ in files for w in (WEIGHTS_NAME, WEIGHTS_NAME_BIN))
        has_card = os.path.exists(os.path.join(save_directory, "README.md"))
        with atomic_directory(save_directory, stale=stale) as tmp:
            for sub, config, state, auto_mapping in files:
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
                save_adapter_weights(state, os.path.join(tmp, sub), safe_serialization)
                config.save_pretrained(os.path.join(tmp, sub), auto_mapping_dict=auto_mapping)
            if not has_card:
                base = self.peft_config[names[0]].base_model_name_or_path if names else None
                header = "---\nlibrary_name: peft\n" + (f"base_model: {base}\n" if base else "")
                with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                    f.write(header + "tags:\n- lora\n- lorakit\n---\n\nLoRA adapter saved by lorakit.\n")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = None,
        tags: list[str] | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> Any:
        """PEFT's: upload the adapter folder ``save_pretrained`` writes (config, weights, model card; other adapters
        in subfolders) to the Hub repo ``repo_id`` in one commit (``lorakit.io.hub``); ``kwargs`` go to
        ``save_pretrained``. After ``merge_and_unload()`` the result is a transformers model: its own
        ``push_to_hub`` publishes the merged model. Offline, raises ``HubUnavailableError`` naming HF_HUB_OFFLINE.
        ``max_shard_size`` is accepted and unused (an adapter is one file), as in PEFT."""
        from lorakit.io.hub import push_adapter_to_hub

        return push_adapter_to_hub(
            self, repo_id, save_kwargs={"safe_serialization": safe_serialization, **kwargs}, tags=tags,
            commit_message=commit_message, commit_description=commit_description, private=private, token=token,
            revision=revision, create_pr=create_pr,
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> _IncompatibleKeys:
        """Load an adapter folder (PEFT's or ours) as ``adapter_name``; frozen unless ``is_trainable`` (without it the
        model is put in eval mode, as in PEFT). Other adapters' ``requires_grad`` and the active adapter are untouched.
        On a mismatch the model is left as it was.

        An existing ``adapter_name`` gets the file's weights copied in (tensors keep their identity, so an optimizer
        holding them goes on), as transformers' Trainer does on resume; its config must match in rank, alpha and
        variant; ``is_trainable=True`` makes it trainable, the default leaves its ``requires_grad`` as it was (PEFT).
        ``torch_device`` is accepted as in PEFT: the weights land on the device of the adapter's tensors.
        ``kwargs``: Hub download arguments (``revision``, ``token``, ...)."""
        hub = split_load_kwargs(kwargs, "load_adapter")
        if ephemeral_gpu_offload:
            raise NotImplementedError("load_adapter(ephemeral_gpu_offload=True) is not implemented in lorakit.")
        config = LoraConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
        tensors = remap_keys(load_adapter_weights(os.fspath(model_id), subfolder=subfolder, **hub), key_mapping)
        if adapter_name in self.peft_config:
            result = self._reload_adapter(adapter_name, config, tensors, is_trainable)
        else:
            config.inference_mode = not is_trainable
            warn_if_in_prefix(adapter_name)
            self.base_model.inject(config, adapter_name, initialize=False)
            try:
                if not autocast_adapter_dtype:
                    self._keep_base_dtype(adapter_name)
                result = self._adapter_result(adapter_name, check_and_copy(self, adapter_name, config.bias, tensors))
            except BaseException:
                self.base_model.delete_adapter(adapter_name)
                raise
        if not is_trainable:  # as PEFT: an adapter loaded for inference puts the model in eval mode (no dropout)
            self.eval()
        return result

    def _reload_adapter(
        self, adapter_name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], is_trainable: bool
    ) -> _IncompatibleKeys:
        existing = self.peft_config[adapter_name]
        check_reload_compatible(existing, config, adapter_name)
        merged = [m for m in self.base_model._wrappers() if adapter_name in m.merged_adapters]
        if merged:
            raise ValueError(
                f"cannot reload adapter {adapter_name!r} while it is merged into the base weights; call "
                "unmerge_adapter() first."
            )
        result = self._adapter_result(adapter_name, check_and_copy(self, adapter_name, existing.bias, tensors))
        if is_trainable:  # the default (False) leaves requires_grad as it was, as PEFT does: transformers' Trainer
            self.set_requires_grad(adapter_name, True)  # reloads its best checkpoint that way, mid-training too
            existing.inference_mode = False
            mark_bias_trainable(self.get_base_model(), existing.bias)
        return result

    @staticmethod
    def _adapter_result(adapter_name: str, result: _IncompatibleKeys) -> _IncompatibleKeys:
        """PEFT's ``load_adapter`` result: only the loaded adapter's own missing keys (none: those raise)."""
        missing = [k for k in result.missing_keys if f".adapters.{adapter_name}." in k]
        return _IncompatibleKeys(missing_keys=missing, unexpected_keys=result.unexpected_keys)

    def _keep_base_dtype(self, adapter_name: str) -> None:
        """``autocast_adapter_dtype=False``: the adapter's tensors in the base weights' dtype instead of fp32."""
        model = self.get_base_model()
        base_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for module in model.modules():
            if isinstance(module, LORA_WRAPPERS) and adapter_name in module.adapters:
                module.adapters[adapter_name].to(base_dtype)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        torch_device: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter in ``model_id`` (a folder or Hub repo) as ``adapter_name``.
        On failure ``model`` is left exactly as it was. ``key_mapping`` (default: the model's
        ``_checkpoint_conversion_mapping``, as PEFT) renames file keys; ``kwargs``: Hub download arguments.
        ``torch_device`` as in ``load_adapter``."""
        hub = split_load_kwargs(kwargs, "from_pretrained")
        if ephemeral_gpu_offload:
            raise NotImplementedError("from_pretrained(ephemeral_gpu_offload=True) is not implemented in lorakit.")
        if config is None:
            config = LoraConfig.from_pretrained(model_id, subfolder=subfolder, **hub)
        config = copy.deepcopy(config)
        config.inference_mode = not is_trainable
        if key_mapping is None:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        tensors = remap_keys(load_adapter_weights(os.fspath(model_id), subfolder=subfolder, **hub), key_mapping)
        from lorakit.tasks import MODEL_TYPE_TO_PEFT_MODEL

        klass = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel) if cls is PeftModel else cls
        snapshot = {n: p.requires_grad for n, p in model.named_parameters()}
        peft_model = klass(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, initialize=False)
        try:
            check_and_copy(peft_model, adapter_name, config.bias, tensors)
        except BaseException:
            eject_adapter(model, adapter_name)
            for n, p in model.named_parameters():
                p.requires_grad_(snapshot.get(n, p.requires_grad))
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model
