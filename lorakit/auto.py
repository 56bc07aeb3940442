"""``AutoPeftModel`` and ``AutoPeftModelFor...`` (PEFT's ``peft.auto``): load an adapter folder together with the base
model its ``adapter_config.json`` names (``base_model_name_or_path``, at ``revision``).

``AutoPeftModelForCausalLM.from_pretrained(adapter)`` is ``AutoModelForCausalLM.from_pretrained(base, **kwargs)``
followed by ``PeftModelForCausalLM.from_pretrained(base_model, adapter)``; the other classes pair the task types'
transformers Auto classes with their ``PeftModelFor...`` classes. ``AutoPeftModel`` serves adapters saved without
a task type, through the config's ``auto_mapping`` (the base model's class).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import nn

from lorakit.config import LoraConfig, PeftConfig
from lorakit.io.files import resolve_file
from lorakit.io.load import hub_kwarg_names
from lorakit.model import PeftModel
from lorakit.tasks import (
    MODEL_TYPE_TO_PEFT_MODEL,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

#: PEFT's ``get_default_import_allowlist()``: the libraries ``auto_mapping`` may import a base model class from.
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

#: ``PeftModel.from_pretrained`` parameters for the adapter only (not passed to the base model's loader).
_ADAPTER_ONLY = ("autocast_adapter_dtype", "ephemeral_gpu_offload", "key_mapping", "subfolder", "torch_device")


def check_import_allowlist(allowlist: list[str] | tuple[str, ...], parent_name: str) -> bool:
    """True if ``parent_name`` is in ``allowlist`` or a submodule of one of its entries (PEFT's rule)."""
    return parent_name in allowlist or any(parent_name.startswith(f"{allowed}.") for allowed in allowlist)


class _BaseAutoPeftModel:
    """Shared ``from_pretrained``; subclasses name the transformers Auto class and the ``PeftModel`` class."""

    #: Name of the transformers Auto class that loads the base model (None: ``auto_mapping`` decides).
    _target_class: str | None = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(  # PEFT's (and transformers' Auto classes') error
            f"{type(self).__name__} is designed to be instantiated using the "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)` method."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named by the adapter's config, then the adapter (PEFT's parameters).

        ``revision`` is the adapter's (the base model's comes from the config). ``kwargs`` go to the base model's
        ``from_pretrained`` (``torch_dtype``, ``device_map``, ``trust_remote_code``, Hub arguments such as
        ``token``, ...); Hub arguments, ``low_cpu_mem_usage`` and ``PeftModel.from_pretrained``'s own
        (``autocast_adapter_dtype``, ``subfolder`` (the adapter's), ``key_mapping``, ``torch_device``,
        ``ephemeral_gpu_offload``) go to the adapter's loading. As in PEFT, a tokenizer saved with the
        adapter that is larger than the base's vocabulary resizes the embeddings first. ``import_allowlist``
        (default ``DEFAULT_IMPORT_ALLOWLIST``) limits what ``auto_mapping`` may import."""
        path = os.fspath(pretrained_model_name_or_path)
        hub_names = hub_kwarg_names()
        hub = {k: v for k, v in kwargs.items() if k in hub_names}
        if revision is not None:
            hub["revision"] = revision
        peft_config = PeftConfig.from_pretrained(path, subfolder=kwargs.get("subfolder"), **hub)
        target_class = cls._target_class_for(peft_config, import_allowlist)
        base_kwargs = {k: v for k, v in kwargs.items() if k not in _ADAPTER_ONLY}
        base_model = _load_base_model(cls.__name__, path, target_class, peft_config, base_kwargs)
        _resize_to_saved_tokenizer(base_model, path, revision, kwargs)
        adapter_kwargs = {k: v for k, v in kwargs.items() if k in _ADAPTER_ONLY or k == "low_cpu_mem_usage"}
        return cls._target_peft_class.from_pretrained(
            base_model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **adapter_kwargs,
            **hub,
        )

    @classmethod
    def _target_class_for(cls, peft_config: LoraConfig, import_allowlist: list[str] | None) -> Any:
        """The class whose ``from_pretrained`` loads the base model, with PEFT's checks and errors."""
        import transformers

        task_type = peft_config.task_type
        if task_type is not None:
            if cls._target_class is None:
                raise ValueError(
                    "Cannot use `AutoPeftModel` with a task type, please use a specific class for your task type. "
                    "(e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`)"
                )
            expected = MODEL_TYPE_TO_PEFT_MODEL[task_type]
            if cls._target_peft_class.__name__ != expected.__name__:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__} make sure that you are loading the correct model for your "
                    "task type."
                )
            return getattr(transformers, cls._target_class)
        # no task type (any of the classes, as in PEFT): the base model's class recorded in auto_mapping
        mapping = peft_config.auto_mapping
        if mapping is None:
            raise ValueError(
                "Cannot infer the auto class from the config, please make sure that you are loading the correct "
                "model for your task type."
            )
        library = mapping["parent_library"]
        allowlist = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else import_allowlist
        if not check_import_allowlist(allowlist, library):
            raise ValueError(
                f"The auto mapping wants to import '{library}' which is not in the import allowlist. If you are "
                f"sure that importing this library is safe, specify `import_allowlist=['{library}']` in "
                "`from_pretrained()`."
            )
        return getattr(importlib.import_module(library), mapping["base_model_class"])


def _load_base_model(
    caller: str, adapter_path: str, target_class: Any, peft_config: LoraConfig, kwargs: dict[str, Any]
) -> nn.Module:
    """``target_class.from_pretrained(base_model_name_or_path, revision=..., **kwargs)``; a missing or unloadable
    base raises an error naming the path and the ways out."""
    base = peft_config.base_model_name_or_path
    fix = (
        f"or load the base model yourself and call PeftModel.from_pretrained(base_model, {adapter_path!r})."
    )
    if not base:
        raise ValueError(
            f"{caller}.from_pretrained({adapter_path!r}): its adapter_config.json has no base_model_name_or_path, "
            f"so there is no base model to load. Set base_model_name_or_path there to the base model's folder or "
            f"Hub id, {fix}"
        )
    try:
        return target_class.from_pretrained(base, revision=peft_config.revision, **kwargs)
    except (OSError, ValueError) as e:
        local = os.path.isabs(base) or base.startswith((".", "~"))
        why = "there is no such folder" if local and not os.path.isdir(base) else f"{type(e).__name__}: {e}"
        message = (
            f"{caller}.from_pretrained({adapter_path!r}): the base model {base!r} (base_model_name_or_path in its "
            f"adapter_config.json) could not be loaded with {target_class.__name__} ({why}). "
            f"Make {base!r} available (a folder with config.json and the weights, or a Hub repo you can download), "
            f"point base_model_name_or_path in {os.path.join(adapter_path, 'adapter_config.json')} at it, {fix}"
        )
        raise (OSError if isinstance(e, OSError) else ValueError)(message) from e


def _resize_to_saved_tokenizer(base_model: nn.Module, path: str, revision: str | None, kwargs: dict[str, Any]) -> None:
    """PEFT's step: a tokenizer saved with the adapter with more tokens than the base's embeddings resizes them."""
    if not hasattr(base_model, "get_input_embeddings"):
        return
    token = kwargs.get("token", kwargs.get("use_auth_token"))
    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    if resolve_file(path, TOKENIZER_CONFIG_NAME, **hub) is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=revision, token=token, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """An adapter saved without a task type: the base model class comes from the config's ``auto_mapping``."""

    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
