"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for lorakit models and ``lorakit.LoraConfig``.

Use ``from lorakit.integrations.trl import SFTTrainer, DPOTrainer`` in place of ``from trl import ...``. With
PEFT models, PEFT configs or plain models they are TRL's trainers unchanged.

Why subclasses (TRL 1.x, ``trl/trainer/sft_trainer.py``, ``dpo_trainer.py``; all these are ``isinstance`` checks
against PEFT's classes, False for lorakit objects and always False without PEFT installed):

- ``peft_config`` must be a ``peft.PeftConfig`` and is applied with ``peft.get_peft_model``: here a
  ``lorakit.LoraConfig`` is applied with ``lorakit.get_peft_model`` (after ``set_seed(args.seed)``, as TRL does),
  the model first loaded from its name or path with TRL's ``create_model_from_path`` if needed.
- ``add_fused_lm_head`` (TRL's chunked log-prob head, used by every loss) patches
  ``model.get_base_model() if is_peft_model(model) else model``: patching lorakit's wrapper would run
  ``PeftModel.base_model`` (the ``LoraModel``) as the backbone and fail with "'CausalLMOutputWithPast' object has
  no attribute 'last_hidden_state'". So TRL is given the transformers model (lorakit adapts it in place: it holds
  the adapters and only they require grad) and ``trainer.model`` is set back to the lorakit ``PeftModel`` after
  TRL's ``__init__``; training then runs ``PeftModel.forward`` -> the patched transformers forward.
- DPO builds a second full model as the reference unless ``is_peft_model(model)``: here the reference is a view
  of the policy (``ReferenceModel``, no weights of its own) with the adapters disabled (``peft_config=``), or
  with a frozen copy of the adapter named ``ref`` active when a lorakit model is passed, as TRL does for PEFT
  models (the two are the same for a freshly initialised adapter, whose B is zero).
- Saving and reloading checkpoints: ``LorakitTrainerMixin`` (see ``lorakit.integrations.transformers``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import trl
from torch import nn
from transformers import set_seed

from lorakit.config import LoraConfig
from lorakit.integrations.transformers import LorakitTrainerMixin, is_lorakit_model
from lorakit.model import PeftModel

__all__ = ["DPOTrainer", "ReferenceModel", "SFTTrainer"]

DEFAULT_SEED = 42  # transformers.TrainingArguments.seed's default, used when no args are given


class ReferenceModel(nn.Module):
    """DPO's reference model as a view of the policy: ``adapter_name=None`` runs it with the adapters disabled,
    a name runs it with that (frozen) adapter active. Holds no weights: the policy is not a submodule, so TRL's
    ``.eval()``, ``.to()`` and dropout changes on the reference never reach the policy.

    TRL calls it as ``ref_model(**batch, labels=labels, fused_lm_head=True)`` after patching its ``forward`` with
    ``add_fused_lm_head``, which then runs ``self.base_model`` (the backbone) and ``self.get_output_embeddings()``:
    both are the policy's, the backbone called inside the reference context."""

    def __init__(self, policy: PeftModel, adapter_name: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not registered as a submodule (see the class docstring)
        self.adapter_name = adapter_name
        self.config = policy.get_base_model().config

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside the block the policy computes the reference outputs."""
        policy: PeftModel = self.policy
        if self.adapter_name is None:
            with policy.disable_adapter():
                yield
            return
        active = policy.active_adapters
        policy.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            policy.set_adapter(active if len(active) > 1 else active[0])

    @property
    def base_model(self) -> Any:
        backbone = self.policy.get_base_model().base_model

        def run(*args: Any, **kwargs: Any) -> Any:
            with self.reference():
                return backbone(*args, **kwargs)

        return run

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_base_model().get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.reference():
            return self.policy(*args, **kwargs)


def add_reference_adapter(model: PeftModel, name: str = "ref") -> None:
    """A frozen copy of the active adapter named ``name`` (TRL's reference for a model that already has one)."""
    active = model.active_adapter
    model.add_adapter(name, model.peft_config[active])
    params = dict(model.named_parameters())
    for key, param in params.items():
        if f".adapters.{active}." in key:
            params[key.replace(f".adapters.{active}.", f".adapters.{name}.", 1)].data.copy_(param.data)
    model.set_requires_grad(name, False)


class _LorakitTRLMixin(LorakitTrainerMixin):
    """Hands TRL the transformers model of a lorakit ``PeftModel`` (or of one built from a ``lorakit.LoraConfig``)
    and puts the ``PeftModel`` back as ``self.model`` afterwards."""

    callback_handler: Any
    model_wrapped: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parent = super().__init__
        bound = inspect.signature(parent).bind(*args, **kwargs)
        arguments = bound.arguments
        built = isinstance(arguments.get("peft_config"), LoraConfig)
        peft_model = self._lorakit_policy(arguments)
        if peft_model is None:  # a PEFT model / config or a plain model: TRL as it is
            parent(*bound.args, **bound.kwargs)
            return
        base = arguments["model"] = peft_model.get_base_model()
        self._prepare_reference(arguments, peft_model, built)
        # transformers refuses a quantized model unless `_hf_peft_config_loaded` says adapters are attached (set
        # on the PeftModel class; the transformers model gets it only while TRL's __init__ validates it)
        flagged = "_hf_peft_config_loaded" in vars(base)
        base._hf_peft_config_loaded = True
        try:
            parent(*bound.args, **bound.kwargs)
        finally:
            if not flagged:
                del base._hf_peft_config_loaded
        self.model = self.model_wrapped = self.callback_handler.model = peft_model

    @staticmethod
    def _lorakit_policy(arguments: dict[str, Any]) -> PeftModel | None:
        model, peft_config = arguments["model"], arguments.get("peft_config")
        if not isinstance(peft_config, LoraConfig):
            return model if is_lorakit_model(model) else None
        if is_lorakit_model(model):
            raise ValueError(
                "You passed a lorakit PeftModel together with a peft_config: pass either the model with its adapter "
                "or the base model with peft_config (merge_and_unload() the adapter first to train a new one on it)."
            )
        args = arguments.get("args")
        if isinstance(model, str):
            from trl.trainer.utils import create_model_from_path

            init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
            if arguments.get("quantization_config") is not None:
                init_kwargs["quantization_config"] = arguments.pop("quantization_config")
            model = create_model_from_path(model, **init_kwargs)
            if args is not None:
                args.model_init_kwargs = None  # applied here; TRL would warn that they are ignored
        arguments["peft_config"] = None
        set_seed(args.seed if args is not None else DEFAULT_SEED)  # as TRL: adapters initialised reproducibly
        from lorakit.tasks import get_peft_model

        return get_peft_model(model, peft_config)

    def _prepare_reference(self, arguments: dict[str, Any], peft_model: PeftModel, built: bool) -> None:
        """DPO only: see ``DPOTrainer``. ``built``: the adapter was just created from ``peft_config``."""


class SFTTrainer(_LorakitTRLMixin, trl.SFTTrainer):
    """TRL's ``SFTTrainer``; accepts a lorakit ``PeftModel`` as ``model`` or a ``lorakit.LoraConfig`` as
    ``peft_config`` (module docstring: the TRL checks that make the subclass necessary). Only the adapters train;
    packing, ``completion_only_loss`` and ``assistant_only_loss`` are TRL's; checkpoints are adapter-only."""


class DPOTrainer(_LorakitTRLMixin, trl.DPOTrainer):
    """TRL's ``DPOTrainer`` for lorakit models: the reference is the policy itself (``ReferenceModel``), with
    adapters disabled for ``peft_config=`` or a frozen copy ``ref`` of a passed model's adapter (TRL's choices
    for PEFT models); no second copy of the model is loaded. Checkpoints are adapter-only."""

    def _prepare_reference(self, arguments: dict[str, Any], peft_model: PeftModel, built: bool) -> None:
        if arguments.get("ref_model") is not None:
            return
        if not built and "ref" not in peft_model.peft_config:
            add_reference_adapter(peft_model, "ref")
        arguments["ref_model"] = ReferenceModel(peft_model, None if built else "ref")
