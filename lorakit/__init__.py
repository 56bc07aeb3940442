"""lorakit: LoRA and QLoRA fine-tuning with PEFT's public LoRA API.

Code written for PEFT's LoRA runs after changing ``from peft import X`` to ``from lorakit import X``.
"""

from lorakit.config import LoraConfig, PeftType, TaskType
from lorakit.hotswap import hotswap_adapter
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
from lorakit.quant.config import BitsAndBytesConfig
from lorakit.quant.load import load_model, quantize_model
from lorakit.quant.prepare import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "BitsAndBytesConfig",
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
    "hotswap_adapter",
    "load_model",
    "prepare_model_for_kbit_training",
    "quantize_model",
]
