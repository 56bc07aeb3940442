"""LoRA configuration with PEFT's field names, defaults and ``adapter_config.json`` format.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a weight ``W`` (out, in) and learns
``W + scaling * B @ A`` with ``A`` (r, in), ``B`` (out, r), ``scaling = lora_alpha / r``
(or ``lora_alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_NAME = "adapter_config.json"

#: Keys an ``adapter_config.json`` must hold: what its weights compute depends on them (PEFT defaults them).
REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")

#: Version of PEFT whose on-disk format we write (``peft_version`` key); PEFT only reads it for display.
PEFT_FORMAT_VERSION = "0.21.2"

@dataclass(frozen=True)
class InitMethod:
    """One ``init_lora_weights`` value: what it does and where its code is."""

    function: str | None
    """``"module:function"`` run on ``(wrapper, adapter, config)`` after the adapter's own init, or None: the
    adapter's ``reset_parameters`` is the whole init (True, False, "gaussian")."""
    changes_base: bool = False
    """It folds part of the adapter out of the base weight (the base holds a residual afterwards)."""
    linear_only: bool = False
    """Embedding targets refuse it (LoftQ); otherwise they keep their default init, as in PEFT."""


_INIT = "lorakit.variants.init:"
#: The ``init_lora_weights`` registry: every value lorakit implements (``"pissa_niter_<K>"`` is ``"pissa_niter_"``
#: with K subspace iterations). Config validation, injection, loading and saving read it.
INITS: dict[bool | str, InitMethod] = {
    True: InitMethod(None),
    False: InitMethod(None),
    "gaussian": InitMethod(None),
    "pissa": InitMethod(_INIT + "pissa_init", changes_base=True),
    "pissa_niter_": InitMethod(_INIT + "pissa_init", changes_base=True),
    "olora": InitMethod(_INIT + "olora_init", changes_base=True),
    "loftq": InitMethod(_INIT + "loftq_init", changes_base=True, linear_only=True),  # settings: loftq_config
    "eva": InitMethod(_INIT + "eva_init"),  # settings: eva_config
    "corda": InitMethod(_INIT + "corda_init", changes_base=True),  # settings: corda_config
    "orthogonal": InitMethod(_INIT + "orthogonal_init"),
}
#: PEFT's other values, accepted by name and refused with ``NotImplementedError``.
INIT_METHODS_PLANNED = ("mica", "lora_ga")
_INIT_ALLOWED = ", ".join(repr(k) for k in INITS if k != "pissa_niter_") + ", 'pissa_niter_<K>'"


def init_method(value: bool | str) -> InitMethod:
    """The registry entry of a (validated) ``init_lora_weights`` value."""
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        return INITS["pissa_niter_"]
    return INITS[value]


BIAS_MODES = ("none", "all", "lora_only")


class TaskType(str, enum.Enum):
    """What the wrapped transformers model does; picks the ``PeftModelFor...`` class (as in PEFT)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The adapter method. lorakit implements LoRA only."""

    LORA = "LORA"


@dataclass
class LoftQConfig:
    """LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659) settings, PEFT's ``LoftQConfig``; stored on
    ``LoraConfig.loftq_config`` as a dict with these keys."""

    loftq_bits: int = 4
    """Bits of the quantized base: 4 (NF4, blocksize 64) or 8 (row-wise int8)."""
    loftq_iter: int = 1
    """Alternating quantize / SVD steps (>= 1)."""

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise ValueError(f"loftq_bits={self.loftq_bits!r} is invalid; allowed: 4 (NF4), 8 (int8).")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"loftq_iter={self.loftq_iter!r} is invalid: it must be an integer >= 1.")


@dataclass
class EvaConfig:
    """EVA (Paischer et al. 2024, https://arxiv.org/abs/2410.07170) settings, PEFT's ``EvaConfig``."""

    rho: float = 2.0
    """A layer may get up to ``round(r * rho)`` ranks in the redistribution (>= 1; 1 = no redistribution)."""
    tau: float = 0.99
    """Stop when the cosine similarity of each kept component between two batches is >= tau (in [0, 1])."""
    use_label_mask: bool = True
    """Leave out positions whose label is ``label_mask_value``."""
    label_mask_value: int = -100
    """The ignored label value."""
    whiten: bool = False
    """Divide each component by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """``lora_alpha *= new_r / r`` for layers whose rank changed (keeps ``alpha / r``)."""

    def __post_init__(self) -> None:
        if not self.rho >= 1.0:
            raise ValueError(f"rho={self.rho!r} is invalid: it must be >= 1.0.")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau={self.tau!r} is invalid: it must be in [0, 1].")


@dataclass
class CordaConfig:
    """CorDA (Yang et al. 2024, https://arxiv.org/abs/2406.05223) settings, PEFT's ``CordaConfig``."""

    cache_file: str | None = None
    """File for the per-layer SVD of ``W C`` (reused when it exists)."""
    covariance_file: str | None = None
    """File for the per-layer input covariance ``C`` (reused when it exists)."""
    corda_method: str = "ipm"
    """``"ipm"``: the top-r components (instruction-previewed); ``"kpm"``: the last r (knowledge-preserved)."""
    verbose: bool = False
    """Print progress."""
    use_float16_for_covariance: bool = False
    """Accumulate the covariance in the inputs' dtype instead of fp32."""
    prune_temporary_fields: bool = True
    """Accepted for PEFT compatibility; lorakit keeps no temporary fields on the modules."""

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"corda_method={self.corda_method!r} is invalid; allowed: 'ipm', 'kpm'.")


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r`` (Hu et al. 2021), or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, arXiv 2312.03732)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` with ``re.match(f"(.*\\.)?({k})$")``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(frozen=True)
class AdapterSpec:
    """Everything one module's adapter is built from, resolved for that module by ``LoraConfig.spec_for`` (rank and
    alpha patterns applied). The adapter class is ``adapter_class(base kind, variant)`` (``lorakit.adapter``)."""

    r: int
    """Rank of ``B @ A``."""
    lora_alpha: float
    """Numerator of ``scaling``."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    use_rslora: bool = False
    """``scaling = lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``."""
    lora_bias: bool = False
    """``lora_B`` has a bias."""
    init_lora_weights: bool | str = True
    """The adapter's own init: True, False or "gaussian" (other methods run after it, from ``INITS``)."""
    variant: str = "lora"
    """The adapter variant: "lora", "dora", or one registered in ``lorakit.adapter.ADAPTER_CLASSES``."""

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def _is_valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _unsupported(off: Any) -> Any:
    return field(default=off, repr=False, metadata={"peft": "unsupported"})


def _passive(default: Any) -> Any:
    return field(default=default, repr=False, compare=False, metadata={"peft": "passive"})


def _is_off(value: Any, off: Any) -> bool:
    return value in (off, None, {}, False, [])


@dataclass
class PeftConfig:
    """PEFT's base adapter config: the fields every ``adapter_config.json`` has, in PEFT's order. ``LoraConfig`` is
    one (``isinstance(lora_config, PeftConfig)``, as in PEFT); ``PeftConfig.from_pretrained(folder)`` reads a
    folder's config as its ``LoraConfig``. lorakit implements LoRA only: another ``peft_type`` is refused."""

    task_type: TaskType | str | None = None
    """The model's task (``TaskType``); picks the ``PeftModelFor...`` / ``AutoPeftModelFor...`` class."""
    peft_type: PeftType | str | None = None
    """The adapter method: ``"LORA"`` (or None, in a bare ``PeftConfig``)."""
    auto_mapping: Any = _passive(None)
    """PEFT's ``{"base_model_class": ..., "parent_library": ...}`` for ``AutoPeftModel`` without a task type."""
    peft_version: Any = _passive(PEFT_FORMAT_VERSION)
    """The PEFT version whose format the file has (PEFT reads it for display only); lorakit writes 0.21.2's."""
    base_model_name_or_path: str | None = None
    """Name or path of the base model, recorded on save (what ``AutoPeftModelFor...`` loads)."""
    revision: str | None = None
    """Revision of the base model on the Hub."""
    inference_mode: bool = False
    """Frozen adapter (set when loading without ``is_trainable``; saved as True, like PEFT)."""

    def __post_init__(self) -> None:
        if self.peft_type is not None:
            if self.peft_type not in ("LORA", PeftType.LORA):
                raise ValueError(
                    f"peft_type={self.peft_type!r} is not supported: lorakit implements 'LORA' (LoRA) only."
                )
            self.peft_type = PeftType.LORA
        if self.task_type is not None and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                allowed = ", ".join(t.value for t in TaskType)
                raise ValueError(f"task_type={self.task_type!r} is not known; allowed: {allowed} or None.") from None

    @property
    def is_prompt_learning(self) -> bool:
        """PEFT's flag (read by transformers and TRL): LoRA is not prompt learning."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        """PEFT's flag: LoRA is not an adaption prompt."""
        return False

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> LoraConfig:
        """Read ``adapter_config.json`` from a local folder or a Hub repo id (PEFT's parameter names) as a
        ``LoraConfig``. ``kwargs``: ``huggingface_hub.hf_hub_download``'s arguments (``revision``, ``token``, ...),
        and, as in PEFT, config fields used where the file lacks them; others are ignored."""
        from lorakit.io.files import AdapterNotFoundError, resolve_file
        from lorakit.io.load import hub_kwarg_names

        path = pretrained_model_name_or_path
        config_file = resolve_file(path, CONFIG_NAME, subfolder=subfolder, **kwargs)
        if config_file is None:
            where = os.path.join(str(path), subfolder or "")
            raise AdapterNotFoundError(f"{where!r} is not an adapter folder: it has no {CONFIG_NAME}.")
        with open(config_file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{config_file} does not hold a JSON object of config fields.")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(
                f"{config_file} is a {peft_type!r} adapter (peft_type={peft_type!r}); lorakit supports LoRA only "
                "(peft_type 'LORA'). Load it with PEFT, or train a LoRA adapter instead."
            )
        own = {f.name for f in fields(LoraConfig)}
        defaults = {k: v for k, v in kwargs.items() if k in own and k not in hub_kwarg_names()}
        missing = [k for k in REQUIRED_KEYS if k not in data and k not in defaults]
        if missing:  # PEFT would fill in its defaults: weights trained with another r or alpha compute garbage
            raise ValueError(
                f"{config_file} lacks {', '.join(map(repr, missing))}: every adapter_config.json PEFT or lorakit "
                "writes has them, and a default would silently change what the weights compute. Add the values the "
                "adapter was trained with."
            )
        return LoraConfig.from_dict({**defaults, **data})  # the file's values win, as in PEFT


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of one LoRA adapter; field names and defaults are PEFT's ``LoraConfig`` (which comes first:
    ``PeftConfig``'s fields, then these)."""

    r: int = 8
    """Rank of the update ``B @ A``."""
    target_modules: list[str] | str | None = None
    """Module names (exact or ``.suffix`` match), a regex (``re.fullmatch`` on the full name), or ``"all-linear"``.
    None picks the usual names for the model type (e.g. ``q_proj``, ``v_proj`` for Llama)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted; same matching rules as ``target_modules``; checked first."""
    lora_alpha: int | float = 8
    """Numerator of ``scaling``."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """True when the base stores its weight as (in, out), like GPT-2's ``Conv1D`` (set automatically for it)."""
    bias: str = "none"
    """Which biases train: ``"none"``, ``"all"`` (every bias of the model) or ``"lora_only"`` (adapted layers)."""
    use_rslora: bool = False
    """rsLoRA: ``scaling = lora_alpha / sqrt(r)``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full (a trainable copy; the original is kept for disable/unload)."""
    init_lora_weights: bool | str = True
    """True: A Kaiming-uniform, B zeros. ``"gaussian"``: A ~ N(0, 1/r). False: B random too (tests only)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt layers with these indices (taken from names like ``model.layers.<i>.``)."""
    layers_pattern: list[str] | str | None = None
    """The name before the layer index (e.g. ``"layers"``, ``"h"``), for ``layers_to_transform``."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """{module-name regex or suffix: r} overriding ``r`` per module."""
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    """{module-name regex or suffix: alpha} overriding ``lora_alpha`` per module."""
    lora_bias: bool = False
    """Give ``lora_B`` a trainable bias."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024, https://arxiv.org/abs/2402.09353)."""
    loftq_config: dict[str, int] = field(default_factory=dict)
    """``{"loftq_bits": 4, "loftq_iter": 1}`` (a ``LoftQConfig`` is converted) for ``init_lora_weights="loftq"``."""
    eva_config: EvaConfig | None = None
    """Settings of ``init_lora_weights="eva"`` (default ``EvaConfig()``)."""
    corda_config: CordaConfig | None = None
    """Settings of ``init_lora_weights="corda"`` (default ``CordaConfig()``)."""
    peft_type: PeftType | str = PeftType.LORA
    """Always ``"LORA"``."""

    # PEFT 0.21.2's LoRA fields that lorakit does not implement, with the value meaning "off" as default, so that
    # ``LoraConfig(**json.load(open("adapter_config.json")))`` and PEFT code passing them switched off still run.
    # Any other value raises NotImplementedError naming the field.
    alora_invocation_tokens: Any = _unsupported(None)
    arrow_config: Any = _unsupported(None)
    ensure_weight_tying: Any = _unsupported(False)
    kasa_config: Any = _unsupported(None)
    layer_replication: Any = _unsupported(None)
    lora_ga_config: Any = _unsupported(None)
    megatron_config: Any = _unsupported(None)
    monteclora_config: Any = _unsupported(None)
    target_parameters: Any = _unsupported(None)
    trainable_token_indices: Any = _unsupported(None)
    use_bdlora: Any = _unsupported(None)
    use_qalora: Any = _unsupported(False)
    velora_config: Any = _unsupported(None)
    # PEFT fields that carry no behaviour here; kept and written back with PEFT's values so PEFT reads our files.
    megatron_core: Any = _passive("megatron.core")
    qalora_group_size: Any = _passive(16)

    def __post_init__(self) -> None:
        for name, off in _UNSUPPORTED_PEFT_KEYS.items():
            if not _is_off(getattr(self, name), off):
                raise NotImplementedError(
                    f"{name}={getattr(self, name)!r} (a PEFT feature) is not implemented in lorakit; leave it at "
                    f"{off!r}."
                )
            setattr(self, name, off)  # None / {} / [] / False all mean "off"; written back as PEFT's default
        super().__post_init__()  # peft_type and task_type
        self.peft_type = PeftType.LORA
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is invalid: the rank must be a positive integer (e.g. 8, 16, 64).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is invalid: it must be a number.")
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} is invalid: it must be a finite number (e.g. 2 * r).")
        if self.lora_alpha == 0:
            warnings.warn(
                "lora_alpha=0 makes scaling = 0: the adapter changes nothing and does not train. Use e.g. 2 * r.",
                stacklevel=3,
            )
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is invalid: it must be in [0, 1).")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is invalid; allowed: {', '.join(map(repr, BIAS_MODES))}.")
        self.target_modules = self._check_names("target_modules", self.target_modules)
        # PEFT treats an empty exclude_modules as none (and saves it as []); an empty target_modules fails there too
        self.exclude_modules = self._check_names("exclude_modules", self.exclude_modules or None)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(
                    f"modules_to_save={self.modules_to_save!r} is invalid: it must be a list of module names."
                )
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, list | tuple):
            if not all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
                raise ValueError(
                    f"layers_to_transform={self.layers_to_transform!r} is invalid: it must be a non-negative "
                    "int or a list of them."
                )
            self.layers_to_transform = list(self.layers_to_transform)
        elif self.layers_to_transform is not None and not isinstance(self.layers_to_transform, int):
            raise ValueError(f"layers_to_transform={self.layers_to_transform!r} must be an int, a list or None.")
        if self.layers_pattern and self.layers_to_transform is None:  # PEFT: an empty pattern ("" or []) is none
            raise ValueError("layers_pattern is only used with layers_to_transform; set layers_to_transform too.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a regex string; "
                "put the layer indices in the regex instead."
            )
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ValueError(f"{name}={pattern!r} is invalid: it must be a dict {{module pattern: value}}.")
            for key, value in pattern.items():
                if not _is_valid_regex(key):
                    raise ValueError(f"{name} key {key!r} is not a valid regular expression.")
                if name == "rank_pattern" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(f"rank_pattern[{key!r}]={value!r} is invalid: ranks must be positive integers.")
                if name == "alpha_pattern" and (
                    isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                ):
                    raise ValueError(f"alpha_pattern[{key!r}]={value!r} is invalid: it must be a finite number.")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            warnings.warn(
                "use_rslora with rank_pattern/alpha_pattern: scaling is alpha / sqrt(r) with each module's own "
                "r and alpha (as in PEFT).",
                stacklevel=2,
            )
        init = self.init_lora_weights
        if isinstance(init, str):
            method = init.lower()
            if method in INITS and method != "pissa_niter_":
                self.init_lora_weights = method
            elif method.startswith("pissa_niter_"):
                if not method.removeprefix("pissa_niter_").isdigit():
                    raise ValueError(
                        f"init_lora_weights={init!r}: write 'pissa_niter_<K>' with K the number of subspace "
                        "iterations of the randomized SVD, a whole number >= 0 (e.g. 'pissa_niter_4'), or 'pissa' "
                        "for the exact SVD."
                    )
                self.init_lora_weights = method
            elif method in INIT_METHODS_PLANNED:
                raise NotImplementedError(
                    f"init_lora_weights={init!r} is not implemented yet in lorakit; available: {_INIT_ALLOWED}."
                )
            else:
                raise ValueError(f"init_lora_weights={init!r} is unknown; allowed: {_INIT_ALLOWED}.")
        elif not isinstance(init, bool):
            raise ValueError(f"init_lora_weights={init!r} is invalid; allowed: {_INIT_ALLOWED}.")
        self._check_init_configs()
        for name in ("fan_in_fan_out", "use_rslora", "lora_bias", "inference_mode", "use_dora"):
            if getattr(self, name) is None:  # PEFT reads these by truth value; its files may hold null
                setattr(self, name, False)
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be true or false.")
        if self.use_dora and self.lora_bias:  # PEFT refuses the pair too, so no adapter file holds it
            raise ValueError("lora_bias=True is not supported with use_dora=True: set one of them to False.")
        if self.lora_bias and not isinstance(self.init_lora_weights, bool):
            # PEFT refuses these too, so an adapter folder saved with them would not load in PEFT
            raise ValueError(
                f"lora_bias=True is only supported with init_lora_weights=True or False (as in PEFT), got "
                f"init_lora_weights={self.init_lora_weights!r}: set lora_bias=False or use the default init."
            )

    def _check_init_configs(self) -> None:
        """PEFT's rules for ``loftq_config`` / ``eva_config`` / ``corda_config``: dicts become dataclasses (LoftQ
        stays a dict, as PEFT saves it), a missing one is an error (loftq) or the default (eva, corda), and one
        given for another init is dropped with a warning."""
        init = self.init_lora_weights
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = asdict(self.loftq_config)
        if self.loftq_config and not isinstance(self.loftq_config, dict):
            raise ValueError(f"loftq_config={self.loftq_config!r} is invalid: pass a LoftQConfig or a dict.")
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError(
                    "init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}."
                )
            self.loftq_config = asdict(LoftQConfig(**self.loftq_config))
        elif self.loftq_config:
            warnings.warn("loftq_config is ignored: init_lora_weights is not 'loftq'.", stacklevel=3)
            self.loftq_config = {}
        for name, klass, method in (("eva_config", EvaConfig, "eva"), ("corda_config", CordaConfig, "corda")):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = klass(**value)
            elif value is not None and not isinstance(value, klass):
                raise ValueError(f"{name}={value!r} is invalid: pass a {klass.__name__}, a dict or None.")
            if init == method and value is None:
                value = klass()
            elif init != method and value is not None:
                warnings.warn(f"{name} is ignored: init_lora_weights is not {method!r}.", stacklevel=3)
            setattr(self, name, value)

    @staticmethod
    def _check_names(name: str, value: Any) -> list[str] | str | None:
        if value is None:
            return None
        if isinstance(value, str):
            if value.lower() != "all-linear" and not _is_valid_regex(value):
                raise ValueError(
                    f"{name}={value!r} is not a valid regular expression; pass a list of module names, a regex "
                    "(matched with re.fullmatch on the full module name) or 'all-linear'."
                )
            return value
        if isinstance(value, list | tuple | set | frozenset) and all(isinstance(v, str) for v in value):
            items = sorted(value) if isinstance(value, set | frozenset) else list(value)
            if not items:
                raise ValueError(f"{name}=[] is empty: name at least one module, use a regex or 'all-linear'.")
            return items
        raise ValueError(f"{name}={value!r} is invalid: it must be a list of names, a regex string or None.")

    def scaling_for(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scaling(r, alpha, self.use_rslora)

    @property
    def variant(self) -> str:
        """The adapter variant this config asks for: "dora" with ``use_dora``, else "lora"."""
        return "dora" if self.use_dora else "lora"

    def spec_for(self, module_name: str) -> AdapterSpec:
        """The adapter of module ``module_name``: ``rank_pattern`` / ``alpha_pattern`` applied (PEFT's lookup), the
        adapter's own init (True for the methods of ``INITS`` that run after it)."""
        own_init = self.init_lora_weights if init_method(self.init_lora_weights).function is None else True
        return AdapterSpec(
            r=int(pattern_value(self.rank_pattern, module_name, self.r)),
            lora_alpha=pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
            lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora,
            lora_bias=self.lora_bias,
            init_lora_weights=own_init,
            variant=self.variant,
        )

    # ---- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The keys and values PEFT writes into ``adapter_config.json`` (enums as strings, lists for sets)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, enum.Enum):
                value = value.value
            out[key] = value
        out["peft_version"] = PEFT_FORMAT_VERSION  # the format written is PEFT 0.21.2's, whatever was read
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, auto_mapping_dict: dict | None = None) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically). ``auto_mapping_dict`` (PEFT's:
        ``{"base_model_class": ..., "parent_library": ...}``, which ``AutoPeftModel`` needs for ``task_type=None``)
        is written as ``auto_mapping``."""
        from lorakit.io.files import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        if auto_mapping_dict is not None:
            data["auto_mapping"] = auto_mapping_dict
        text = json.dumps(data, indent=2, sort_keys=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from a PEFT-style dict. Unknown keys (a newer PEFT) are dropped with a warning; known PEFT
        features lorakit lacks (its PEFT-only fields) raise ``NotImplementedError`` when switched on."""
        data = dict(data)
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"This adapter has peft_type={peft_type!r}; lorakit loads 'LORA' adapters only.")
        own = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in own:
                kwargs[key] = value
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"adapter config has keys lorakit does not know (written by a newer PEFT?); ignored: "
                f"{', '.join(sorted(unknown))}",
                stacklevel=2,
            )
        return cls(**kwargs)


#: PEFT's LoRA fields lorakit does not implement, with their "off" value (the fields' defaults).
_UNSUPPORTED_PEFT_KEYS: dict[str, Any] = {
    f.name: f.default for f in fields(LoraConfig) if f.metadata.get("peft") == "unsupported"
}
