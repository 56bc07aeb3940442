"""Model inspection and training-memory estimates from `config.json` alone (meta device, no weights).

Memory of one training step, per process, in bytes (P = parameters, P_t = trainable parameters)::

    weights      full / lora: P * bytes(dtype)
                 qlora: P_q * (0.5 + 4 / 64) + (P - P_q) * bytes(dtype)      # NF4 + one fp32 absmax per 64
                        (double quantization: P_q * (0.5 + 1/64 + 4/(64*256)))   QLoRA, arXiv:2305.14314
    adapters     P_lora * 4                                 # LoRA weights are fp32
    gradients    P_t * 4 (lora/qlora) | P * bytes(dtype) (full)
    optimizer    P_t * 8                                    # AdamW: exp_avg + exp_avg_sq in fp32
    activations  per token and layer, the tensors autograd keeps for a Llama-style block (elements):
                   5 h + 3 h_q + 3 h_kv + 4 I   (norm inputs/outputs and the block's residual, q, rotated q,
                                              attention output, k, v, rotated k, gate, up, act(gate),
                                              act(gate) * up; h_q = heads * head_dim, h_kv = kv heads *
                                              head_dim: head_dim * heads need not be h, e.g. Qwen3, Gemma)
                 times (B * T) tokens, L layers, bytes(compute dtype); with gradient checkpointing only
                 the block inputs are kept (h per token and layer) plus one block recomputed at a time.
                 LM head: B * T * V * 4 * 2 (fp32 logits and their softmax gradient), or one
                 chunk of it with the chunked loss (about 128 MiB at most).

The activation count follows the per-layer accounting of Korthikanti et al. 2022
(https://arxiv.org/abs/2205.05198), adapted to a gated MLP and grouped-query attention, with
memory-efficient attention (no T x T score matrix kept).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "query_key_value", "query",
                   "key", "value", "dense", "Wqkv", "out_proj", "qkv_proj", "W_pack")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")


def meta_model(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """Build the causal LM of `name_or_path` from its config.json (a GGUF file: its metadata) on the meta device
    (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.quant.gguf_in import find_gguf, gguf_config
    from lorakit.train.evaluate import model_path_errors

    gguf_file = find_gguf(name_or_path)  # a .gguf model: its config from the file's metadata
    with model_path_errors(name_or_path), torch.device("meta"):
        config = gguf_config(gguf_file) if gguf_file is not None else AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features); GPT-2 Conv1D stores its weight as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


@dataclass
class LinearGroup:
    """Linear layers with one role: the same last name component, shape and attention-or-not, e.g. every
    `q_proj`. A suffix used in several roles (GPT-2's `attn.c_proj` 64->64 and `mlp.c_proj` 256->64) gives one
    group per role, named with the parent module (a valid `target_modules` entry: it matches `.attn.c_proj`)."""

    name: str
    shape: tuple[int, int]  # (in, out), the same for every layer of the group
    paths: list[str] = field(default_factory=list)
    is_attention: bool = False
    lora_per_rank: int = 0  # sum of (in + out) over the group: LoRA parameters per unit of rank
    suffix: str = ""  # the last name component


def linear_groups(model: nn.Module) -> OrderedDict[str, LinearGroup]:
    """Linear layers grouped by role (suffix, shape, attention or not), excluding the output embedding (as
    `"all-linear"` does); keyed by group name."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    by_role: OrderedDict[tuple[str, tuple[int, int], bool], LinearGroup] = OrderedDict()
    for path, module in model.named_modules():
        if not _is_linear(module) or module is output:
            continue
        suffix = path.rsplit(".", 1)[-1]
        shape = _linear_shape(module)
        in_attention = bool(re.search(r"attn|attention", path, re.IGNORECASE))
        is_attention = in_attention and suffix in ATTENTION_NAMES
        group = by_role.setdefault((suffix, shape, is_attention),
                                   LinearGroup(suffix, shape, is_attention=is_attention, suffix=suffix))
        group.paths.append(path)
        group.lora_per_rank += shape[0] + shape[1]
    roles_per_suffix: dict[str, int] = {}
    for suffix, _, _ in by_role:
        roles_per_suffix[suffix] = roles_per_suffix.get(suffix, 0) + 1
    groups: OrderedDict[str, LinearGroup] = OrderedDict()
    for (suffix, shape, _), group in by_role.items():
        if roles_per_suffix[suffix] > 1:
            parts = group.paths[0].rsplit(".", 2)
            group.name = f"{parts[-2]}.{suffix}" if len(parts) == 3 else suffix
            if group.name in groups:  # same parent name, another shape: say the shape
                group.name = f"{group.name} ({shape[0]}->{shape[1]})"
        groups[group.name] = group
    return groups


def suggest_target_modules(groups: dict[str, LinearGroup]) -> dict[str, list[str]]:
    """target_modules for attention-only LoRA (the LoRA paper) and for all linear layers (QLoRA paper)."""
    attention = [name for name, g in groups.items() if g.is_attention]
    return {"attention": attention, "all-linear": list(groups)}


def lora_parameters(groups: dict[str, LinearGroup], targets: list[str], r: int) -> int:
    """r * (in + out) summed over every targeted linear layer."""
    return r * sum(groups[name].lora_per_rank for name in targets)


@dataclass
class MemoryEstimate:
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    lm_head: int

    def total(self, gradient_checkpointing: bool) -> int:
        acts = self.activations_checkpointed if gradient_checkpointing else self.activations
        return self.weights + self.adapters + self.gradients + self.optimizer + acts + self.lm_head


def estimate_memory(model: nn.Module, method: str, seq_len: int, batch_size: int, r: int = 16,
                    target: str = "all-linear", dtype: str = "bfloat16", chunked_loss: bool = True,
                    double_quant: bool = False) -> MemoryEstimate:
    """Memory of one training step (see the module docstring for every term), from a meta-device model."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPE_BYTES)}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("r", r)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    nbytes = DTYPE_BYTES[dtype]
    groups = linear_groups(model)
    if target in ("attention", "all-linear"):
        targets = suggest_target_modules(groups)[target]
    else:
        targets = [key for key, g in groups.items() if target in (g.name, g.suffix)]
        if not targets:
            names = sorted({g.name for g in groups.values()})
            raise ValueError(f"target {target!r} is not a linear module of this model; allowed: all-linear, "
                             f"attention, {', '.join(names)}")
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = 0 if method == "full" else lora_parameters(groups, targets, r)

    if method == "qlora":  # every linear layer but the output layer is stored in NF4
        n_quant = sum(g.shape[0] * g.shape[1] * len(g.paths) for g in groups.values())
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
        weights = int(n_quant * per_param + (n_params - n_quant) * nbytes)
    else:
        weights = n_params * nbytes
    trainable = n_params if method == "full" else n_lora
    gradients = n_params * nbytes if method == "full" else n_lora * 4
    optimizer = trainable * 8

    cfg = model.config
    h = cfg.hidden_size
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    h_q, h_kv = heads * head_dim, kv * head_dim
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    tokens = seq_len * batch_size
    per_token_layer = 5 * h + 3 * h_q + 3 * h_kv + 4 * inter  # elements, see module docstring
    activations = tokens * layers * per_token_layer * nbytes
    checkpointed = tokens * layers * h * nbytes + tokens * per_token_layer * nbytes
    vocab = cfg.vocab_size
    logits = tokens * vocab * 4 * 2
    lm_head = min(logits, 2 * 2**25 * 4) if chunked_loss else logits
    return MemoryEstimate(weights, n_lora * 4, gradients, optimizer, activations, checkpointed, lm_head)
