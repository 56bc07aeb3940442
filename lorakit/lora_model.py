"""``LoraModel``: the adapted transformers model (``self.model``) plus its adapters' configs, and the model-wide
operations on them (inject, activate, delete, merge, unload, disable). ``PeftModel.base_model`` is one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from lorakit.config import LoraConfig, init_method
from lorakit.inject import (
    TASK_HEAD_NAMES,
    add_modules_to_save,
    eject_adapter,
    inject_adapter,
    mark_bias_trainable,
    recorded_target_modules,
    set_active_adapters,
)
from lorakit.layers import LORA_WRAPPERS, LoraLinear, ModulesToSaveWrapper, check_adapter_name, forwarding_getattr


class LoraModel(nn.Module):
    """Holds the adapted model (``self.model``) and the adapters' configs; does the model-wide operations."""

    def __init__(
        self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", initialize: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self._active_adapter: str | list[str] = []  # PEFT's active_adapter: what set_adapter was given
        trainable = {p: p.requires_grad for p in model.parameters()}
        model.requires_grad_(False)
        try:
            self.inject(config, adapter_name, initialize)
            self.set_adapter([adapter_name])
        except BaseException:  # leave the user's model as it was (inject already removed its wrappers)
            for param, flag in trainable.items():
                param.requires_grad_(flag)
            raise

    __getattr__ = forwarding_getattr("model")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ---- adapters -----------------------------------------------------------------------------------------
    def inject(self, config: LoraConfig, adapter_name: str, initialize: bool = True) -> None:
        """Add adapter ``adapter_name`` described by ``config`` (not activated). On any error the model is left
        as it was. ``initialize=False`` (adapters about to be loaded from a file) skips ``init_lora_weights``:
        base-modifying inits (pissa, olora, loftq, corda) must not run again on a base that already holds the
        residual, and data-driven ones (eva) have nothing to run on."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; choose another name.")
        config = copy.deepcopy(config)
        heads = TASK_HEAD_NAMES.get(config.task_type, ())
        if heads:  # the task head (new, randomly initialised) trains in full and is saved, as in PEFT
            extra = [h for h in heads if h not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        if self.peft_config and config.bias != "none":
            raise ValueError(
                f"adapter {adapter_name!r} has bias={config.bias!r}: with several adapters, biases would be "
                "shared between them; use bias='none' for all but one adapter (as PEFT requires)."
            )
        saved_targets = recorded_target_modules(self.model, config)
        to_inject = config if initialize else dataclasses.replace(config, init_lora_weights=True)
        init = config.init_lora_weights
        if not initialize and init_method(init).changes_base:
            warnings.warn(
                f"adapter {adapter_name!r} was made with init_lora_weights={init!r}, which changes the base weights. "
                "lorakit loads it without re-running that init (PEFT re-runs it on load): load it onto the base "
                "model it was trained on (the residual saved with it), or save it with "
                "path_initial_model_for_weight_conversion to get a plain LoRA for the original base.",
                stacklevel=3,
            )
        try:
            targets = inject_adapter(self.model, to_inject, adapter_name)
            if config.modules_to_save:
                add_modules_to_save(self.model, config.modules_to_save, adapter_name, not config.inference_mode)
        except BaseException:
            eject_adapter(self.model, adapter_name)
            raise
        config.target_modules = saved_targets
        modules = dict(self.model.named_modules())
        linear = [modules[t] for t in targets if isinstance(modules[t], LoraLinear)]
        if linear:  # PEFT corrects the config at each layer whose type disagrees: the last linear target's decides
            config.fan_in_fan_out = linear[-1].fan_in_fan_out
        if not config.inference_mode:
            mark_bias_trainable(self.model, config.bias)
        self.peft_config[adapter_name] = config
        # Wrappers created now know only this adapter; keep the active set as it is.
        set_active_adapters(self.model, self.active_adapters)
        self._active_adapter = list(self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` (or several) the active adapter(s). Does not change ``requires_grad`` (unlike PEFT),
        except that ``inference_mode=True`` freezes the adapters it activates (PEFT's meaning). A merged model is
        unmerged first, with PEFT's warning (the merged adapters would otherwise stay in the weights)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} not found; available: {sorted(self.peft_config)}.")
        if any(module.merged_adapters for module in self._wrappers()):
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=3)
            self.unmerge_adapter()
        self.active_adapters = names
        self._active_adapter = adapter_name if isinstance(adapter_name, str) else names
        set_active_adapters(self.model, names)
        if inference_mode:
            self.set_requires_grad(names, False)

    @property
    def active_adapter(self) -> str | list[str]:
        """PEFT's ``LoraModel.active_adapter``: what ``set_adapter`` was given (a name or a list); the list of
        active adapters after adding, loading or deleting one."""
        return self._active_adapter

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the transformers model) of the modules that have LoRA adapters, in module order."""
        return [name for name, module in self.model.named_modules() if isinstance(module, LORA_WRAPPERS)]

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Explicitly (un)freeze the named adapters' parameters (nothing else flips them)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"adapter {name!r} not found; available: {sorted(self.peft_config)}.")
        for module in self.model.modules():
            if isinstance(module, LORA_WRAPPERS):
                for name in names:
                    if name in module.adapters:
                        module.adapters[name].requires_grad_(requires_grad)
            elif isinstance(module, ModulesToSaveWrapper):
                for name in names:
                    if name in module.modules_to_save:
                        module.modules_to_save[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available: {sorted(self.peft_config)}.")
        eject_adapter(self.model, adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
            warnings.warn(  # PEFT's warning: the active adapter changes
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.",
                stacklevel=3,
            )
        self.active_adapters = remaining
        self._active_adapter = list(remaining)
        set_active_adapters(self.model, remaining)

    def disable_adapter_layers(self) -> None:
        """PEFT's in-place switch: the base model alone until ``enable_adapter_layers()``. Merged adapters are
        unmerged now (the outputs would otherwise still hold them)."""
        self._warn_trained_biases()
        self.unmerge_adapter()
        self._set_disabled(True)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``."""
        self._set_disabled(False)

    def _warn_trained_biases(self) -> None:
        for config in (self.peft_config[n] for n in self.active_adapters):
            if config.bias != "none":  # PEFT's warning: trained biases stay in the base layers
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{config.bias}' does not produce "
                    "the same output as the base model would without adaption.",
                    stacklevel=4,
                )

    def _set_disabled(self, disabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, LORA_WRAPPERS + (ModulesToSaveWrapper,)):
                module.disabled = disabled

    def _wrappers(self) -> Iterator[nn.Module]:
        return (m for m in self.model.modules() if isinstance(m, LORA_WRAPPERS))

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """PEFT's ``add_weighted_adapter``: see ``lorakit.merge.combine.add_weighted_adapter``."""
        from lorakit.merge.combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    # ---- merging ------------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the (active) adapters into the base weights, keeping the wrappers (undo with unmerge_adapter).
        All or nothing: if one layer refuses (``safe_merge`` found non-finite weights), the layers merged by this
        call are unmerged again before the error propagates."""
        names = list(adapter_names if adapter_names is not None else self.active_adapters)
        self._untie_merged_embeddings(names)
        done: list[tuple[nn.Module, int]] = []
        try:
            for module in self._wrappers():
                done.append((module, len(module.merged_adapters)))
                module.merge(names, safe_merge=safe_merge)
        except BaseException:
            for module, merged_before in done:
                module.unmerge(keep=merged_before)
            raise

    def unmerge_adapter(self) -> None:
        for module in self._wrappers():
            module.unmerge()

    def _replace_wrappers(self, merge: bool, adapter_names: list[str] | None, safe_merge: bool) -> nn.Module:
        from lorakit.fused import disable_fused

        disable_fused(self.model)  # the original module instances come back before the wrappers go
        if merge:  # all layers merged (or none, on error) before any wrapper is removed
            self.merge_adapter(adapter_names, safe_merge)
        modules = dict(self.model.named_modules())
        for name, module in list(modules.items()):
            if isinstance(module, LORA_WRAPPERS):
                replacement = module.base_layer
            elif isinstance(module, ModulesToSaveWrapper):  # PEFT: the active adapter's (trained) copy, both ways
                active = module.active_adapter
                replacement = module.original_module if active is None else module.modules_to_save[active]
            else:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else self.model, child, replacement)
        self.peft_config.clear()
        self.active_adapters = []
        self._active_adapter = []
        self._untie_config_if_diverged()
        return self.model

    def _embeddings(self) -> tuple[nn.Module, nn.Module] | None:
        """The input and output embeddings of a transformers model whose config ties them, else None."""
        if not getattr(getattr(self.model, "config", None), "tie_word_embeddings", False):
            return None
        try:
            layers = (self.model.get_input_embeddings(), self.model.get_output_embeddings())
        except (NotImplementedError, AttributeError):
            return None
        return None if None in layers else layers

    def _untie_config_if_diverged(self) -> None:
        """PEFT's fix after merging: a trained copy (modules_to_save) of a tied input or output embedding leaves the
        two weights apart; ``tie_word_embeddings=True`` would tie them again on save/load or ``tie_weights()``."""
        layers = self._embeddings()
        weights = [getattr(m, "weight", None) for m in layers or ()]
        if layers and None not in weights and weights[0].data_ptr() != weights[1].data_ptr():
            self.model.config.tie_word_embeddings = False
            warnings.warn(
                "Input and output embeddings are no longer tied after merging. Setting `tie_word_embeddings=False` in "
                "the model config.",
                stacklevel=4,
            )

    def _untie_merged_embeddings(self, names: list[str]) -> None:
        """Before merging LoRA into a tied input/output embedding, give each adapted one its own copy of the shared
        weight: merging into the shared tensor would add the delta to the other layer too (PEFT does, and its merged
        model then differs from the unmerged one). The config is untied, as the weights now are."""
        layers = self._embeddings()
        if layers is None:
            return
        bases = [m.base_layer if isinstance(m, LORA_WRAPPERS) else m for m in layers]
        if getattr(bases[0], "weight", None) is None or bases[0].weight is not getattr(bases[1], "weight", None):
            return
        merging = [m for m in layers if isinstance(m, LORA_WRAPPERS) and any(n in m.adapters for n in names)]
        for module in merging:
            weight = module.base_layer.weight
            module.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if merging:
            self.model.config.tie_word_embeddings = False
            warnings.warn(
                "Merging LoRA into a tied input/output embedding: the two layers now hold separate copies of the "
                "weight (merging into the shared one would change the other layer too); setting "
                "`tie_word_embeddings=False` in the model config.",
                stacklevel=4,
            )

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model (no wrappers left).
        ``progressbar`` is accepted for PEFT compatibility; merging is fast enough to need none."""
        return self._replace_wrappers(True, adapter_names, safe_merge)

    def unload(self) -> nn.Module:
        """Return the plain base model without merging (LoRA adapters dropped); as in PEFT, a module in
        ``modules_to_save`` comes back as the active adapter's trained copy."""
        return self._replace_wrappers(False, None, False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block. Merged adapters are unmerged on entry and merged back on
        exit (explicit state changes, never inside forward)."""
        self._warn_trained_biases()
        merged = {}
        for module in self._wrappers():
            merged[module] = list(module.merged_adapters)
            module.unmerge()
        switches = {
            m: m.disabled for m in self.model.modules() if isinstance(m, LORA_WRAPPERS + (ModulesToSaveWrapper,))
        }
        for module in switches:
            module.disabled = True
        try:
            yield
        finally:
            for module, was_disabled in switches.items():  # nested blocks: the outer one stays disabled
                module.disabled = was_disabled
            for module, names in merged.items():
                module.merge(names)
