"""Target matching, adapter injection and ejection, and trainable-parameter marking.

Matching follows PEFT's rules (``peft.tuners.tuners_utils.check_target_module_exists``): a list matches a module
whose full name equals an entry or ends with ``"." + entry``; a string is ``re.fullmatch``-ed against the full name;
``"all-linear"`` takes every linear layer except the output layer; ``exclude_modules`` is checked first;
modules in ``modules_to_save`` never get LoRA. Matching is linear in the number of modules: names are tested
against a set of suffixes (O(depth) per module), never against every entry of the list.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import quant
from lorakit.adapter import Adapter
from lorakit.config import LoraConfig, TaskType, init_method
from lorakit.layers import LORA_WRAPPERS, LoraEmbedding, LoraLinear, ModulesToSaveWrapper, _LoraWrapper

#: PEFT's default ``target_modules`` per transformers ``model_type`` (used when ``target_modules`` is None).
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **dict.fromkeys(
        [
            "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "bart", "opt",
            "gptj", "stablelm", "mllama", "cohere", "granite", "gpt_neo", "llama4",
        ],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["RefinedWeb", "RefinedWebModel", "chatglm"], ["query_key_value"]),
    **dict.fromkeys(["electra", "layoutlm"], ["query", "value"]),
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "deberta": ["in_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # a regex: the vision tower's q/v stay without LoRA
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "mpt": ["Wqkv"],
}

#: Classification heads (PEFT's ``SEQ_CLS`` head names).
SEQ_CLS_HEAD_NAMES = ("classifier", "score")
#: The freshly initialised task heads PEFT adds to ``modules_to_save`` per task type (they train in full and are
#: saved with the adapter).
TASK_HEAD_NAMES: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: SEQ_CLS_HEAD_NAMES,
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}


def linear_features(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, fan_in_fan_out)`` for a linear-like module, or None if it is not one."""
    if isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape  # Conv1D stores (in, out)
        return in_f, out_f, True
    if isinstance(module, nn.Linear) or quant.is_quantized_linear(module):
        return module.in_features, module.out_features, False
    return None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, LoraLinear) or linear_features(module) is not None


SUPPORTED_TYPES = (
    "torch.nn.Linear, transformers' Conv1D (GPT-2), torch.nn.Embedding, lorakit/bitsandbytes 4-bit and 8-bit linear"
)


def _suffixes(name: str) -> Iterable[str]:
    """All dotted suffixes of a module name: 'a.b.c' -> 'a.b.c', 'b.c', 'c'."""
    parts = name.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[i:])


def _matches_names(name: str, names: set[str] | str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return any(s in names for s in _suffixes(name))


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _output_layer_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """Names that ``all-linear`` leaves out: the output embedding, or for SEQ_CLS without one, the head."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return set()
    ids = {id(m): n for n, m in model.named_modules()}
    output = model.get_output_embeddings()
    if output is not None:
        return {ids[id(output)]} if id(output) in ids else set()
    if config.task_type == TaskType.SEQ_CLS:
        for head in SEQ_CLS_HEAD_NAMES:
            module = getattr(model, head, None)
            if module is not None and id(module) in ids:
                return {ids[id(module)]}
    return set()


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The concrete ``target_modules`` for this model: PEFT's per-architecture default when None."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        default = DEFAULT_TARGET_MODULES[model_type]
        return default if isinstance(default, str) else list(default)
    raise ValueError(
        f"target_modules is None and lorakit has no default for model_type={model_type!r}: set target_modules "
        "to a list of module names (see `lorakit inspect MODEL`), a regex, or 'all-linear'."
    )


def find_targets(model: nn.Module, config: LoraConfig, exclusions: bool = True) -> list[str]:
    """Full names of the modules of ``model`` that ``config`` adapts, in module order (linear time).
    ``exclusions=False`` ignores ``exclude_modules``, ``layers_to_transform`` and ``modules_to_save``: for
    ``"all-linear"``, the names PEFT saves as ``target_modules`` (it applies those fields when matching, not when
    expanding)."""
    target = resolve_target_modules(model, config)
    all_linear = isinstance(target, str) and target.lower() == "all-linear"
    target_set: set[str] | str = target if isinstance(target, str) else set(target)
    exclude = config.exclude_modules if exclusions else None
    exclude_set: set[str] | str | None = exclude if isinstance(exclude, str) or exclude is None else set(exclude)
    to_save = set(config.modules_to_save or []) if exclusions else set()
    skip_output = _output_layer_names(model, config) if all_linear else set()
    layer_ids = config.layers_to_transform if exclusions else None
    # PEFT: an empty list selects no layer subset (all layers), like None
    layer_ids = {layer_ids} if isinstance(layer_ids, int) else set(layer_ids) if layer_ids else None

    found: list[str] = []
    inside: list[str] = []  # prefixes of wrappers; their internals (base_layer, adapters) never match
    for name, module in model.named_modules():
        if not name:
            continue
        if inside and name.startswith(inside[-1]):
            continue
        if isinstance(module, LORA_WRAPPERS + (ModulesToSaveWrapper,)):
            inside.append(name + ".")
        if exclude_set is not None and _matches_names(name, exclude_set):
            continue
        if to_save and any(f".{m}." in f".{name}." for m in to_save):
            continue  # a module to save, or inside one (PEFT: never both LoRA and a full copy)
        if all_linear:
            if name in skip_output or not _is_linear(module):
                continue
        elif not _matches_names(name, target_set):
            continue
        # PEFT: layers_to_transform filters name-suffix matches; an entry naming the module exactly is kept
        if layer_ids is not None and not isinstance(target_set, str) and name not in target_set:
            idx = _layer_index(name, config.layers_pattern)
            if idx is None or idx not in layer_ids:
                continue
        found.append(name)
    return found


#: PEFT's ``MIN_TARGET_MODULES_FOR_OPTIMIZATION``: a ``target_modules`` list this long is saved condensed.
CONDENSE_TARGETS_FROM = 20


def condense_targets(targets: list[str], module_names: list[str]) -> list[str]:
    """PEFT's ``_find_minimal_target_modules``, applied as PEFT does to lists of >= 20 entries (``all-linear``
    expanded, or the user's): the fewest name suffixes that match ``targets`` and none of the other modules of
    ``module_names`` (the model's module names before injection); ``targets`` unchanged if that is not shorter."""
    if len(targets) < CONDENSE_TARGETS_FROM:
        return targets
    ends = tuple("." + t for t in targets)
    wanted = set(targets)
    others = {n for n in module_names if n not in wanted and not n.endswith(ends)}

    def suffixes(name: str) -> list[str]:  # shortest first: 'a.b.c' -> 'c', 'b.c', 'a.b.c'
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for n in others for s in suffixes(n)}
    required: set[str] = set()
    for item, item_suffixes in sorted(((t, suffixes(t)) for t in wanted), key=lambda pair: pair[1]):
        for suffix in item_suffixes:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + r) for r in required):
                required.add(suffix)
                break
    return sorted(required) if required and len(required) < len(targets) else targets


def recorded_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """What PEFT records as ``target_modules`` for ``config`` on ``model`` (before injection): its default for the
    model type when None, ``"all-linear"`` expanded to the linear layers' names (before ``exclude_modules`` /
    ``layers_to_transform``), lists of >= 20 entries condensed; a regex unchanged."""
    targets = config.target_modules
    if targets is None:
        targets = resolve_target_modules(model, config)
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = sorted(find_targets(model, config, exclusions=False))
    if isinstance(targets, str):
        return targets
    return condense_targets(list(targets), [n for n, _ in model.named_modules()])


def _set_submodule(model: nn.Module, name: str, new: nn.Module, modules: dict[str, nn.Module]) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = modules[parent_name] if parent_name else model
    setattr(parent, child, new)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Add adapter ``adapter_name`` to every module ``config`` targets, wrapping plain layers as needed.

    Returns the adapted module names. Raises ``ValueError`` if nothing matches or a matched module has a type
    LoRA cannot wrap. New adapter parameters are trainable unless ``config.inference_mode``.
    """
    targets = find_targets(model, config)
    exclude = config.exclude_modules
    if exclude and not any(n and _matches_names(n, exclude if isinstance(exclude, str) else set(exclude))
                           for n, _ in model.named_modules()):
        warnings.warn(  # PEFT's check: most likely a misspelt name
            f"You have passed exclude_modules={exclude!r} but no modules were excluded. Please check that "
            "exclude_modules was set correctly.",
            stacklevel=3,
        )
    if not targets:
        target = resolve_target_modules(model, config)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ValueError(
            f"target_modules={target!r} matched no module of the model "
            f"(exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}). "
            f"Linear layers of this model are named: {linear[:30]}; or use target_modules='all-linear'."
        )
    modules = dict(model.named_modules())
    no_bias: list[str] = []
    for name in targets:
        module = modules[name]
        if isinstance(module, LORA_WRAPPERS):
            wrapper: _LoraWrapper = module
        elif isinstance(module, nn.Embedding):
            wrapper = LoraEmbedding(module)
        else:
            feats = linear_features(module)
            if feats is None:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}) was targeted but LoRA supports only: "
                    f"{SUPPORTED_TYPES}. Adjust target_modules (e.g. target a child layer of {name!r})."
                )
            in_f, out_f, is_conv1d = feats
            if config.fan_in_fan_out != is_conv1d:
                # PEFT's behaviour: the layer type decides; say so once per mismatching layer.
                warnings.warn(
                    f"fan_in_fan_out={config.fan_in_fan_out} but {name!r} is {type(module).__name__}, which stores "
                    f"its weight as {'(in, out)' if is_conv1d else '(out, in)'}: using fan_in_fan_out={is_conv1d}.",
                    stacklevel=3,
                )
            wrapper = LoraLinear(module, in_f, out_f, fan_in_fan_out=is_conv1d)
        if adapter_name in wrapper.adapters:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}.")
        adapter = wrapper.add_adapter(adapter_name, config.spec_for(name))
        run_init(wrapper, adapter, config, name)
        adapter.requires_grad_(not config.inference_mode)
        if wrapper is not module:
            _set_submodule(model, name, wrapper, modules)
        if config.lora_bias and isinstance(wrapper, LoraLinear) and getattr(wrapper.base_layer, "bias", None) is None:
            no_bias.append(name)
    if no_bias:  # PEFT warns too: merge() will refuse these layers
        warnings.warn(
            f"lora_bias=True but {len(no_bias)} targeted layer(s) have no bias (e.g. {no_bias[0]!r}): the adapter "
            "trains and runs, but merging it into those layers will not be possible.",
            stacklevel=3,
        )
    return targets


def run_init(wrapper: _LoraWrapper, adapter: Adapter, config: LoraConfig, module_name: str) -> None:
    """Run ``config.init_lora_weights``' method from the ``INITS`` registry on ``adapter`` of ``wrapper``, after the
    adapter's own init, then ``adapter.after_init``. An embedding adapter keeps its default init (A = 0,
    B ~ N(0, 1)), as in PEFT: the methods decompose linear weights; a ``linear_only`` method (LoftQ, which
    quantizes every target's base) refuses it."""
    if run_init_method(wrapper, adapter, config, module_name):
        adapter.after_init(wrapper)


def run_init_method(wrapper: _LoraWrapper, adapter: Adapter, config: LoraConfig, module_name: str) -> bool:
    """The method part of `run_init` (without ``after_init``); returns whether a method ran."""
    method = init_method(config.init_lora_weights)
    if method.function is None:
        return False
    if not isinstance(wrapper, LoraLinear):
        if method.linear_only:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} applies to linear layers only; {module_name!r} is "
                f"{type(wrapper.base_layer).__name__}: exclude it (exclude_modules) or use init_lora_weights=True."
            )
        return False
    module, _, function = method.function.partition(":")
    getattr(importlib.import_module(module), function)(wrapper, adapter, config)
    return True


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str, trainable: bool) -> list[str]:
    """Wrap each module whose full name ends with an entry of ``names`` (PEFT's rule: plain ``str.endswith``, so
    ``"norm"`` takes every ``...layernorm`` too and ``"head"`` takes ``lm_head``) in a ``ModulesToSaveWrapper`` and
    give it a copy for ``adapter_name``. Returns the wrapped module names. A LoRA-wrapped module that matches
    raises ``TypeError``, as in PEFT (a fully trained copy of a layer that also has LoRA factors); the insides of
    LoRA wrappers are not matched."""
    wanted = tuple(names)
    modules = dict(model.named_modules())
    found = []
    inside = ""
    for name, module in list(modules.items()):
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, (ModulesToSaveWrapper, *LORA_WRAPPERS)):
            inside = name + "."
        if name.endswith(wanted) and not name.endswith((".original_module", ".modules_to_save", ".base_layer")):
            if isinstance(module, LORA_WRAPPERS):
                entry = next(n for n in wanted if name.endswith(n))
                raise TypeError(
                    f"modules_to_save entry {entry!r} matches {name!r}, which has LoRA adapters "
                    f"({type(module).__name__}): modules_to_save cannot be applied to it (PEFT refuses it too). Name "
                    "the modules to train in full more precisely (entries match by name suffix), or drop the layer "
                    "from target_modules."
                )
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
            wrapper.add_adapter(adapter_name, trainable)
            if wrapper is not module:
                _set_submodule(model, name, wrapper, modules)
                inside = name + "."
            found.append(name)
    heads = {h for names_ in TASK_HEAD_NAMES.values() for h in names_}  # task heads: one of them is absent
    unmatched = [n for n in names if n not in heads and not any(f.endswith(n) for f in found)]
    if unmatched:
        warnings.warn(
            f"modules_to_save entries {unmatched} match no module of the model (entries match by module-name suffix, "
            "outside LoRA layers); nothing is trained in full for them.",
            stacklevel=4,
        )
    return found


def eject_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` everywhere; wrappers left with no adapter are replaced by their base module,
    so a model whose only adapter is ejected is exactly the model it was."""
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        if isinstance(module, LORA_WRAPPERS):
            module.delete_adapter(adapter_name)
            if len(module.adapters) == 0 and not module.merged_adapters:
                _set_submodule(model, name, module.base_layer, modules)
        elif isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(adapter_name)
            if len(module.modules_to_save) == 0:
                _set_submodule(model, name, module.original_module, modules)


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` the active adapters of every wrapper (requires_grad is left as it is)."""
    for module in model.modules():
        if isinstance(module, LORA_WRAPPERS + (ModulesToSaveWrapper,)):
            module.set_active(names)


def mark_bias_trainable(model: nn.Module, bias: str) -> None:
    """PEFT's bias modes: ``"all"`` trains every bias, ``"lora_only"`` the biases of adapted layers."""
    if bias == "none":
        return
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".adapters." not in name and ".original_module." not in name:
                param.requires_grad_(True)
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LORA_WRAPPERS) and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
