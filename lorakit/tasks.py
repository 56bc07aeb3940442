"""The task classes (``PeftModelForCausalLM``, ...), one per ``TaskType`` as in PEFT, and ``get_peft_model``,
which picks the class of a config's task type."""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.inject import eject_adapter
from lorakit.layers import LORA_WRAPPERS, warn_if_in_prefix
from lorakit.model import PeftModel


def _task_forward(positional: tuple[str, ...], keyword: tuple[str, ...] = ()) -> Any:
    """A ``forward`` taking PEFT's task-class parameters: ``positional`` in PEFT's order (a positional argument
    means what it means in PEFT, whatever the base model's own order), then ``keyword`` (keyword-only), all passed
    on by name to ``PeftModel.forward``. ``task_ids`` (PEFT's, for prompt learning) is dropped, as PEFT does for
    LoRA; unnamed keywords go through.

    transformers' Trainer drops dataset columns that the model's forward signature does not name (it looks through
    only PEFT's own classes to the base model), so each task class names its inputs, as PEFT's task classes do.
    """

    def forward(self: PeftModel, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if len(args) > len(positional):
            raise TypeError(f"forward() takes at most {len(positional)} positional arguments ({len(args)} given).")
        for name, value in zip(positional, args, strict=False):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}.")
            kwargs[name] = value
        kwargs.pop("task_ids", None)
        return PeftModel.forward(self, adapter_names=adapter_names, **kwargs)

    kind, named = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", kind)]
        + [inspect.Parameter(name, kind, default=None) for name in positional]
        + [inspect.Parameter(name, named, default=None) for name in (*keyword, "adapter_names")]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    )
    return forward


_TEXT = ("input_ids", "attention_mask", "inputs_embeds")
_OUTPUTS = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")


class PeftModelForCausalLM(PeftModel):
    """Causal language models (``TaskType.CAUSAL_LM``)."""

    forward = _task_forward((*_TEXT, "labels", *_OUTPUTS), ("position_ids",))


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification (``TaskType.SEQ_CLS``): the head (``classifier``/``score``) trains in full."""

    forward = _task_forward((*_TEXT, "labels", *_OUTPUTS), ("token_type_ids", "position_ids"))


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models (``TaskType.SEQ_2_SEQ_LM``)."""

    forward = _task_forward(
        (*_TEXT, "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds", "labels", *_OUTPUTS)
    )


class PeftModelForTokenClassification(PeftModel):
    """Token classification (``TaskType.TOKEN_CLS``): the head (``classifier``/``score``) trains in full."""

    forward = _task_forward((*_TEXT, "labels", *_OUTPUTS), ("token_type_ids", "position_ids"))


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive question answering (``TaskType.QUESTION_ANS``): the head (``qa_outputs``) trains in full."""

    forward = _task_forward(
        ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "start_positions",
         "end_positions", *_OUTPUTS)
    )


class PeftModelForFeatureExtraction(PeftModel):
    """Feature extraction / embeddings (``TaskType.FEATURE_EXTRACTION``)."""

    forward = _task_forward((*_TEXT, *_OUTPUTS), ("token_type_ids", "position_ids"))


MODEL_TYPE_TO_PEFT_MODEL: dict[TaskType | None, type[PeftModel]] = {
    None: PeftModel,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new LoRA adapter; returns the ``PeftModelFor...`` class of ``peft_config.task_type``.

    Adapters are created in fp32 over half-precision bases (PEFT's ``autocast_adapter_dtype=True``); with
    ``autocast_adapter_dtype=False`` they take the base weight's dtype.
    """
    if mixed:
        raise NotImplementedError("get_peft_model(mixed=True) (PeftMixedModel) is not implemented in lorakit.")
    if isinstance(model, PeftModel) or any(isinstance(m, LORA_WRAPPERS) for m in model.modules()):
        warnings.warn(  # PEFT's warning, for a PeftModel or a base model that already has adapters
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before.",
            stacklevel=2,
        )
        if not isinstance(model, PeftModel):  # as PEFT: the new config replaces an adapter of the same name
            eject_adapter(model, adapter_name)
    if revision is not None:
        peft_config = copy.deepcopy(peft_config)
        peft_config.revision = revision
    warn_if_in_prefix(adapter_name)
    klass = MODEL_TYPE_TO_PEFT_MODEL[peft_config.task_type]
    return klass(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)

