"""lorakit: LoRA and QLoRA fine-tuning with PEFT's public LoRA API.

Code written for PEFT's LoRA runs after changing ``from peft import X`` to ``from lorakit import X``.
"""

from lorakit.config import LoraConfig, PeftType, TaskType
from lorakit.model import (
    LoraModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_peft_model",
]
