"""The YAML schema of `lorakit train`: typed sections, command-line overrides, schema checks.

A config file has a training method and up to seven top-level sections::

    method:        sft | dpo | orpo | kto | simpo (default sft) # TrainConfig.method
    model:         {name_or_path, torch_dtype, ...}             # ModelConfig
    quantization:  nf4 | fp4 | int8 | none, or a mapping      # QuantizationConfig
    lora:          every field of lorakit.LoraConfig            # checked against LoraConfig itself
    data:          lorakit.train.data.DataConfig fields
    training:      TrainingArguments / TRL names              # TrainingConfig
    evaluation:    optional before/after exact-match check    # GenerationEvalConfig
    preference:    beta, loss_type, ... of dpo/orpo/kto/simpo   # PreferenceConfig

Overrides use dotted keys, values parsed as YAML: ``training.learning_rate=1e-4``,
``lora.target_modules=[q_proj,v_proj]``. Unknown keys are rejected with the closest valid name
(difflib); a value of the wrong type or outside an allowed set names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.train.data import DataConfig

CONFIG_FILENAME = "train_config.yaml"  # the resolved config, written into output_dir

QuantMethod = Literal["none", "nf4", "fp4", "int8"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
QuantStorage = Literal["uint8", "int8", "float16", "bfloat16", "float32", "int16", "int32"]
Scheduler = Literal["cosine", "linear", "constant"]
Method = Literal["sft", "dpo", "orpo", "kto", "simpo"]
Optim = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


class ConfigError(ValueError):
    """A config file or override that does not match the schema; the message names the key."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub id or local folder of the base model (transformers `from_pretrained`)."""
    torch_dtype: DType = "float32"
    """dtype of the non-quantized weights. LoRA weights are always kept in float32."""
    attn_implementation: str | None = None
    """Passed to `from_pretrained` ("sdpa", "eager", "flash_attention_2"); None = transformers' default."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository."""
    adapter_name_or_path: str | None = None
    """Start from an existing adapter instead of a fresh one (explicit; `--resume` is separate)."""

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is required (a Hub id or a local model folder)")


@dataclass
class QuantizationConfig:
    """bitsandbytes-style quantization of the frozen base (QLoRA: https://arxiv.org/abs/2305.14314)."""

    method: QuantMethod = "none"
    """none | nf4 | fp4 (4-bit, QLoRA) | int8 (LLM.int8)."""
    bnb_4bit_compute_dtype: DType = "float32"
    """dtype the 4-bit weights are dequantized to for the matmul."""
    bnb_4bit_use_double_quant: bool = False
    """Quantize the per-block absmax constants too (saves ~0.37 bit/parameter)."""
    bnb_4bit_quant_storage: QuantStorage = "uint8"
    """Storage dtype of the packed 4-bit weights (bfloat16 for FSDP)."""
    llm_int8_threshold: float = 6.0
    """int8 only: outlier threshold of LLM.int8 (https://arxiv.org/abs/2208.07339), saved with the model; lorakit's
    int8 layers never quantize activations (every column is computed as LLM.int8 computes outliers), so it
    changes no output."""
    llm_int8_skip_modules: list[str] | None = None
    """Modules kept in full precision (the output layer is always kept)."""


@dataclass
class TrainingConfig:
    """Training fields, named as in transformers `TrainingArguments` and TRL `SFTConfig`."""

    output_dir: str = "outputs/run"
    """Where checkpoints, the final adapter, metrics and plots go."""
    num_train_epochs: float = 1.0
    """Epochs over the training set; ignored when max_steps > 0."""
    max_steps: int = -1
    """Total optimizer steps; -1 = derive from num_train_epochs."""
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) on the trainable weights; biases and norms are excluded."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    nonfinite_patience: int = 0
    """Consecutive optimizer steps with a NaN / inf loss (or gradient norm) that are skipped (no update) before
    the run stops with an error; 0 = stop at the first. A stopped run saves nothing from the bad step."""
    lr_scheduler_type: Scheduler = "linear"
    warmup_ratio: float = 0.0
    """Fraction of the total steps spent warming up linearly from 0 (overridden by warmup_steps > 0)."""
    warmup_steps: int = 0
    """Steps of linear warmup; 0 = use warmup_ratio."""
    optim: Optim = "adamw_torch"
    bf16: bool = False
    """bfloat16 autocast (mixed precision); LoRA weights and optimizer states stay float32."""
    fp16: bool = False
    """float16 autocast with loss scaling (CUDA only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant): less memory, ~30% more compute."""
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (and always at the end when there is eval data)."""
    save_steps: int | None = None
    """Write a checkpoint every this many optimizer steps; None = only the final adapter."""
    save_total_limit: int | None = None
    """Keep only the newest N checkpoints."""
    max_seq_length: int = 1024
    """Examples are truncated to this many tokens (and packed up to it with packing)."""
    packing: bool = False
    """Pack several examples per row, with attention kept inside each example."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir (same as `--resume`)."""
    overwrite_output_dir: bool = False
    """Start a new run in an output_dir that holds an earlier one (its checkpoints and final adapter are deleted
    first); without it such a run is refused."""
    report_to: Literal["all", "tensorboard", "none"] = "all"
    """"all" writes TensorBoard events when tensorboard is importable; "none" writes only metrics.jsonl."""
    fused_lora: bool = False
    """Fused LoRA autograd in every adapted linear and Llama-style MLP (`enable_fused_lora`: fewer saved
    activations, 4-bit weights dequantized on demand). Without it, fp32 linears still fuse where it is exact."""
    offload_activations: bool = False
    """Move saved activations to pinned CPU memory on a side stream (CUDA; for long contexts)."""
    use_chunked_loss: bool = True
    """Compute the LM-head cross-entropy in vocabulary chunks (no full logits tensor) when available."""
    disable_tqdm: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun / accelerate launch) share the work: "ddp" (every process holds the whole
    model) or "fsdp" (FSDP2 ``fully_shard``: each decoder layer, the adapters and their optimizer state sharded
    across processes; see ``lorakit.train.distributed``). One process trains the same either way."""

    def __post_init__(self) -> None:
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "max_seq_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"training.{name} must be >= 1 or null, got {value}")
        for name in ("learning_rate", "num_train_epochs", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                     "max_grad_norm", "warmup_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"training.{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "seed", "nonfinite_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0, got {getattr(self, name)}"
                                  + (" (0 disables clipping)" if name == "max_grad_norm" else ""))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"training.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"training.adam_epsilon must be > 0, got {self.adam_epsilon}")
        if not self.output_dir:
            raise ConfigError("training.output_dir must be a non-empty folder path")
        if self.bf16 and self.fp16:
            raise ConfigError("training.bf16 and training.fp16 are exclusive: pick one")
        if self.num_train_epochs < 0:
            raise ConfigError(f"training.num_train_epochs must be >= 0, got {self.num_train_epochs}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set training.max_steps > 0 or training.num_train_epochs > 0")


@dataclass
class GenerationEvalConfig:
    """Exact match by greedy generation on held-out prompts, before and after training."""

    path: str | None = None
    """Data file with a prompt column and an answer column (put in the training data's format: a user and an
    assistant turn for chats, the alpaca template, or prompt then answer verbatim), or records in the
    training data's own format; None disables the check."""
    prompt_field: str = "prompt"
    """Column of `path` holding the prompt."""
    answer_field: str = "answer"
    """Column of `path` holding the expected answer."""
    max_examples: int = 50
    """Check at most this many records (the first ones)."""
    max_new_tokens: int = 16
    batch_size: int = 16
    generate_samples: int = 3
    """After training: reload the saved adapter (FSDP: the trained model in memory) and print this many
    generations."""

    def __post_init__(self) -> None:
        for name in ("max_examples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name} must be >= 1, got {getattr(self, name)}")
        if self.generate_samples < 0:
            raise ConfigError(f"evaluation.generate_samples must be >= 0, got {self.generate_samples}")
        for name in ("prompt_field", "answer_field"):
            if not getattr(self, name):
                raise ConfigError(f"evaluation.{name} must be a non-empty column name")
        if self.prompt_field == self.answer_field:
            raise ConfigError(f"evaluation.prompt_field and evaluation.answer_field are both "
                              f"{self.prompt_field!r}: name two different columns")


@dataclass
class PreferenceConfig:
    """Preference tuning (``method: dpo | orpo | kto | simpo``), named as in TRL's DPOConfig / CPOConfig / KTOConfig.

    The data has ``prompt`` / ``chosen`` / ``rejected`` columns (KTO: ``prompt`` / ``completion`` / ``label``),
    strings or message lists; see `lorakit.train.preference_data`. The losses are in
    `lorakit.train.losses.preference`.
    """

    beta: float = 0.1
    """DPO/IPO/KTO: strength of the pull towards the reference (IPO's tau); ORPO: weight lambda of the odds-ratio
    term; SimPO: reward scale."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """dpo only: sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023), as TRL's DPOConfig.loss_type."""
    label_smoothing: float = 0.0
    """dpo (sigmoid) and simpo: probability eps that a pair's label is flipped (conservative DPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma (TRL's CPOConfig.simpo_gamma)."""
    desirable_weight: float = 1.0
    """kto: weight lambda_D of desirable completions."""
    undesirable_weight: float = 1.0
    """kto: weight lambda_U of undesirable completions."""
    precompute_ref_log_probs: bool = False
    """dpo/kto: compute the reference log-probs once before training (one no-grad pass) instead of a reference
    forward at every step. Always on when the run starts from model.adapter_name_or_path: the reference is then
    that adapter as loaded."""

    def __post_init__(self) -> None:
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"preference.{name} must be a finite number > 0, got {value}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not math.isfinite(self.simpo_gamma):
            raise ConfigError(f"preference.simpo_gamma must be a finite number, got {self.simpo_gamma}")

    def check(self, method: str) -> None:
        """Refuse settings that `method` would ignore (so a typo in the method is not silently a no-op)."""
        default = PreferenceConfig()
        uses = {"dpo": {"beta", "loss_type", "label_smoothing", "precompute_ref_log_probs"},
                "orpo": {"beta"}, "simpo": {"beta", "simpo_gamma", "label_smoothing"},
                "kto": {"beta", "desirable_weight", "undesirable_weight", "precompute_ref_log_probs"},
                }.get(method, set())
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("preference.label_smoothing applies to loss_type 'sigmoid', not 'ipo'; remove it")
        for f in dataclasses.fields(self):
            if getattr(self, f.name) != getattr(default, f.name) and f.name not in uses:
                raise ConfigError(f"preference.{f.name} does not apply to method: {method}"
                                  + (f" (it applies to: {', '.join(sorted(uses))})" if uses else
                                     " (the preference section is for dpo, orpo, kto and simpo)"))


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `lorakit.LoraConfig`, checked against its fields."""
    evaluation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)
    method: Method = "sft"
    """sft (next-token loss on the answers) or a preference method: dpo (loss_type sigmoid or ipo), orpo, kto,
    simpo, tuned by the `preference` section."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "preference": dataclasses.asdict(self.preference),
            "model": dataclasses.asdict(self.model),
            "quantization": dataclasses.asdict(self.quantization),
            "lora": dict(self.lora),
            "data": dataclasses.asdict(self.data),
            "training": dataclasses.asdict(self.training),
            "evaluation": dataclasses.asdict(self.evaluation),
        }

    def lora_config(self) -> Any:
        """The `lorakit.LoraConfig` of the `lora` section (task_type defaults to CAUSAL_LM)."""
        from lorakit.config import LoraConfig

        kwargs = {"task_type": "CAUSAL_LM", **self.lora}
        try:
            config = LoraConfig(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"lora: {err}") from err
        task = getattr(config.task_type, "value", config.task_type)
        if task not in ("CAUSAL_LM", None):  # the loop loads AutoModelForCausalLM and trains next-token loss
            raise ConfigError(f"lora.task_type={task!r}: `lorakit train` fine-tunes causal language models only "
                              "(next-token loss); use CAUSAL_LM (the default) or leave the key out")
        return config

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write the resolved config (every default filled in) as `output_dir/train_config.yaml`."""
        path = Path(output_dir) / CONFIG_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)
        return path


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quantization": QuantizationConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "evaluation": GenerationEvalConfig,
    "preference": PreferenceConfig,
}
_ALL_SECTIONS = ("method", "model", "quantization", "lora", "data", "training", "evaluation", "preference")
_SHORTHANDS = {"model": "name_or_path", "quantization": "method"}  # `model: path`, `quantization: nf4`


def _closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` (ints widened to float where a float is expected) or raise naming key and type."""
    if tp is Any or isinstance(tp, str | typing.TypeVar):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_value(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals and isinstance(value, str):  # an enum-like string: say which strings are allowed
            raise ConfigError(errors[args.index(literals[0])])
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, list | tuple):
            if args and args[-1] is not Ellipsis and origin is list:
                return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
            return list(value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    else:  # a class we do not model (nested config objects): let its constructor judge
        return value
    raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_type_name(tp)}")


def _build_section(section: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{section}.{key}'{_closest(str(key), names)}")
        kwargs[key] = _check_value(f"{section}.{key}", value, hints.get(key, Any))
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{section}: {err}") from err
    except ConfigError:
        raise
    except ValueError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(f"{section}.") else f"{section}: {msg}") from err


def _check_lora(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"lora: expected a mapping of LoraConfig fields, got {values!r}")
    from lorakit.config import LoraConfig

    hints = typing.get_type_hints(LoraConfig) if dataclasses.is_dataclass(LoraConfig) else {}
    names = [f.name for f in dataclasses.fields(LoraConfig)] if hints else list(values)
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key 'lora.{key}'{_closest(str(key), names)}")
        checked[key] = _check_value(f"lora.{key}", value, hints.get(key, Any))
    return checked


def build_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a parsed YAML mapping and return the typed config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config file must be a mapping of sections ({', '.join(_ALL_SECTIONS)})")
    for key in raw:
        if key not in _ALL_SECTIONS:
            raise ConfigError(f"unknown section '{key}'{_closest(str(key), _ALL_SECTIONS)}; "
                              f"sections: {', '.join(_ALL_SECTIONS)}")
    for required in ("model", "data"):
        if required not in raw:
            raise ConfigError(f"the config has no '{required}' section")
    raw = dict(raw)
    if isinstance(raw.get("model"), str):  # `model: path/to/model` shorthand
        raw["model"] = {"name_or_path": raw["model"]}
    if isinstance(raw.get("quantization"), str) or raw.get("quantization") is None:  # `quantization: nf4`
        raw["quantization"] = {"method": raw.get("quantization") or "none"}
    kwargs = {name: _build_section(name, cls, raw[name] if raw.get(name) is not None else {})
              for name, cls in _SECTIONS.items() if name in raw}
    lora = _check_lora(raw.get("lora") or {})
    method = _check_value("method", raw.get("method") or "sft", Method)
    config = TrainConfig(lora=lora, method=method, **kwargs)
    config.lora_config()  # validate the LoRA values now, not after the model and data have loaded
    config.preference.check(method)
    if method != "sft":
        if config.training.packing:
            raise ConfigError(f"training.packing does not apply to method: {method} (each chosen/rejected or KTO "
                              "row is its own sequence); remove it")
        if config.evaluation.path:
            raise ConfigError(f"evaluation.path (exact match by generation) is for method: sft; a {method} run "
                              "reports held-out preference accuracy before and after training on "
                              "data.validation_path or data.val_set_size. Remove evaluation.path")
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if (len(parts) < 2 and parts[0] not in (*_SHORTHANDS, "method")) or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. training.learning_rate)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it, "
                          "e.g. key='[a, b]' in the shell for a list") from err
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a parsed YAML mapping (a new dict; `raw` is not modified)."""
    out = yaml.safe_load(yaml.safe_dump(raw, sort_keys=False))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 1 and isinstance(out.get(parts[0]), dict):  # `quantization=nf4` keeps the other keys
            parts = [parts[0], _SHORTHANDS[parts[0]]]
        node = out
        for part in parts[:-1]:
            if isinstance(node.get(part), str) and part in _SHORTHANDS:
                node[part] = {_SHORTHANDS[part]: node[part]}
            if node.get(part) is None:  # `evaluation:` with no value in the file is an empty section
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so
    `max_steps: 10` further down a section would quietly replace `max_steps: 600`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (first at line {seen[key]}); keep one",
                    key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate.

    Relative data, model and eval paths are taken relative to the current directory (as the CLI is
    normally run from the project root), not to the YAML file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from err
    return build_config(apply_overrides(raw, overrides))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The problem and its line:column, on one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem
