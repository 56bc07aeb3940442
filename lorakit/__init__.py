"""lorakit: LoRA and QLoRA fine-tuning with PEFT's public LoRA API.

Code written for PEFT's LoRA runs after changing ``from peft import X`` to ``from lorakit import X``.
"""

from lorakit.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from lorakit.config import CordaConfig, EvaConfig, LoftQConfig, LoraConfig, PeftConfig, PeftType, TaskType
from lorakit.fast import FastLanguageModel
from lorakit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from lorakit.io.adapter import get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.lora_model import LoraModel
from lorakit.model import PeftModel
from lorakit.quant.config import BitsAndBytesConfig
from lorakit.quant.load import load_model, quantize_model
from lorakit.quant.prepare import prepare_model_for_kbit_training
from lorakit.status import get_layer_status, get_model_status
from lorakit.tasks import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from lorakit.variants.corda import preprocess_corda
from lorakit.variants.eva import get_eva_state_dict, initialize_lora_eva_weights
from lorakit.variants.loftq_replace import replace_lora_weights_loftq

__version__ = "0.1.0"

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BitsAndBytesConfig",
    "CordaConfig",
    "EvaConfig",
    "FastLanguageModel",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "load_model",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "quantize_model",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
]
