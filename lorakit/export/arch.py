"""Which transformers models export to GGUF, their hyperparameter keys and tensor names (llama.cpp's layout).

The layout is llama.cpp's ``convert_hf_to_gguf.py``: ``LlamaForCausalLM`` and ``MistralForCausalLM`` (and SmolLM,
which is a Llama) become ``general.architecture = "llama"``; ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` become
``"qwen2"`` and ``"qwen3"``. Tensor names come from the gguf package's map
(``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``). For the ``llama`` architecture the rows of
``q_proj`` / ``k_proj`` are permuted from transformers' rotate-half RoPE order to llama.cpp's interleaved order
(``permute_qk``); Qwen2 and Qwen3 use NeoX RoPE in llama.cpp and are written as they are.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` is written."""

    gguf_arch: str
    """``general.architecture`` and the prefix of the hyperparameter keys."""
    permute_qk: bool
    """Permute q/k rows to llama.cpp's interleaved RoPE order (``llama``), or not (NeoX RoPE: ``qwen2``)."""


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),  # Llama 1-3, SmolLM / SmolLM2, TinyLlama
    "mistral": ArchSpec("llama", permute_qk=True),  # llama.cpp converts MistralForCausalLM as "llama"
    "qwen2": ArchSpec("qwen2", permute_qk=False),
    "qwen3": ArchSpec("qwen3", permute_qk=False),  # Qwen2's layout without q/k/v biases, with q/k RMSNorms
}


def arch_spec(config: Any) -> ArchSpec:
    """The spec for ``config.model_type``; a clear error listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise NotImplementedError(f"GGUF export of model_type {model_type!r} is not implemented; supported: "
                                  f"{', '.join(sorted(ARCHS))} (Llama, SmolLM, Mistral, Qwen2, Qwen3)")
    return ARCHS[model_type]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


ROPE_FREQS = "rope_freqs.weight"
"""llama.cpp's tensor of per-frequency RoPE divisors (head_dim / 2,), how Llama 3.1's RoPE scaling is stored."""


def rope_freq_factors(config: Any) -> torch.Tensor | None:
    """``rope_freqs.weight`` for a config with Llama 3.1's RoPE scaling (``rope_type="llama3"``), else None.

    RoPE rotates pair i by ``pos * theta_i``, ``theta_i = base^(-2i/d)``; Llama 3.1 divides the low frequencies by
    ``factor`` and blends the middle band (Meta's Llama 3.1 release; transformers' ``_compute_llama3_parameters``).
    llama.cpp stores the divisor of each frequency as this tensor, so it is the default frequencies over
    transformers' own Llama 3.1 frequencies (computed by transformers, not re-derived here).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "llama3":
        return None
    dim = int(head_dim(config) * rope.get("partial_rotary_factor", 1.0))
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (d/2,)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled).float()


def llama3_rope_from_factors(factors: torch.Tensor, theta: float, dim: int, config: Any) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for a GGUF's ``rope_freqs.weight`` (the inverse of `rope_freq_factors`).

    In the middle band ``1 / f_i = (1 - s_i) / factor + s_i`` with ``s_i = O / (h - l) / lambda_i - l / (h - l)``
    linear in ``1 / lambda_i`` (``lambda_i`` the wavelength): a line through the band's points gives
    ``O / (h - l)`` and ``l / (h - l)``, which fix the factors (any ``(O, l, h)`` with those two values gives the
    same ones; ``l = 1`` is taken). The result is checked by recomputing the factors with transformers.

    Raises NotImplementedError when the file's factors are not of that form (or the band has < 2 points).
    """
    factors = factors.double()
    factor = float(factors.max())
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    x = default / (2 * math.pi)  # 1 / wavelength
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 or int(band.sum()) < 2:
        raise NotImplementedError(f"{ROPE_FREQS} with {int(band.sum())} frequencies between no scaling and the "
                                  "largest factor: cannot rebuild Llama 3.1 RoPE parameters from it")
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)  # s_i
    design = torch.stack([x[band], -torch.ones_like(x[band])], 1)  # s = slope * x - offset
    slope, offset = torch.linalg.lstsq(design, smooth[:, None]).solution[:, 0].tolist()
    high = 1.0 + 1.0 / offset
    fitted = (factor, high, slope * (high - 1.0))
    rounded = (round(factor, 4), round(high, 4), int(round(slope * (high - 1.0))))  # the release's round values
    for f, h, context in (rounded, fitted):
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": f, "low_freq_factor": 1.0,
                "high_freq_factor": h, "original_max_position_embeddings": context}
        check = copy.deepcopy(config)
        check.rope_parameters = rope
        got = rope_freq_factors(check)
        if got is not None and torch.allclose(got.double(), factors, rtol=1e-4, atol=0):
            return rope
    raise NotImplementedError(f"{ROPE_FREQS} is not Llama 3.1 RoPE scaling as transformers computes it")


def hparams(config: Any) -> dict[str, int | float]:
    """``{key: value}`` of the architecture's hyperparameters (ints are written as uint32, floats as float32)."""
    spec = arch_spec(config)
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and spec.gguf_arch != "llama"):
        raise NotImplementedError(f"GGUF export of {config.model_type} with RoPE scaling rope_type={rope_type!r} is "
                                  "not implemented (only rope_type='default', and 'llama3' for Llama)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings and getattr(config, "use_sliding_window", True):
        warnings.warn(f"{config.model_type}: sliding_window={window} is not written to the GGUF (llama.cpp's "
                      f"{spec.gguf_arch} architecture attends to the whole context)", stacklevel=3)
    a = spec.gguf_arch
    hd = head_dim(config)
    kv = {
        f"{a}.vocab_size": config.vocab_size,
        f"{a}.context_length": config.max_position_embeddings,
        f"{a}.embedding_length": config.hidden_size,
        f"{a}.block_count": config.num_hidden_layers,
        f"{a}.feed_forward_length": config.intermediate_size,
        f"{a}.attention.head_count": config.num_attention_heads,
        f"{a}.attention.head_count_kv": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        f"{a}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{a}.rope.freq_base": float(theta),
        f"{a}.rope.dimension_count": hd,
    }
    if hd != config.hidden_size // config.num_attention_heads:
        kv[f"{a}.attention.key_length"] = hd
        kv[f"{a}.attention.value_length"] = hd
    return kv


class TensorNames:
    """transformers parameter name <-> GGUF tensor name for one config."""

    def __init__(self, config: Any) -> None:
        import gguf

        self.spec = arch_spec(config)
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.spec.gguf_arch)
        self._map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        self.n_head = config.num_attention_heads
        self.n_head_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def gguf_name(self, hf_name: str) -> str | None:
        """``blk.0.attn_q.weight`` for ``model.layers.0.self_attn.q_proj.weight``; None for tensors GGUF does not
        store (rotary ``inv_freq`` buffers, a ``lm_head`` tied to the embeddings)."""
        if hf_name.endswith("rotary_emb.inv_freq") or (self.tied and hf_name == "lm_head.weight"):
            return None
        base, _, suffix = hf_name.rpartition(".")
        name = self._map.get_name(base)
        if name is None:
            raise NotImplementedError(f"tensor {hf_name!r} has no GGUF name in the {self.spec.gguf_arch} layout")
        return f"{name}.{suffix}"

    def to_gguf_layout(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """transformers layout -> llama.cpp layout (q/k rows permuted for ``llama``)."""
        if self.spec.permute_qk and ".attn_q." in gguf_name:
            return permute_rows(tensor, self.n_head, self.n_head)
        if self.spec.permute_qk and ".attn_k." in gguf_name:
            return permute_rows(tensor, self.n_head, self.n_head_kv)
        return tensor

    def from_gguf_layout(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_gguf_layout`."""
        if self.spec.permute_qk and ".attn_q." in gguf_name:
            return unpermute_rows(tensor, self.n_head)
        if self.spec.permute_qk and ".attn_k." in gguf_name:
            return unpermute_rows(tensor, self.n_head_kv)
        return tensor


def permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: per head, rows ``[x0..x(d/2-1), y0..]`` -> ``[x0, y0, x1, y1, ...]``.

    transformers rotates pairs ``(i, i + d/2)`` of each head (rotate-half); llama.cpp's ``llama`` RoPE rotates
    adjacent pairs ``(2i, 2i + 1)``. Shapes: ``w`` (n_head * d, in) or a bias (n_head * d,).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rows` (transformers' ``_reverse_permute_weights``)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def config_from_gguf(metadata: dict[str, Any], tensor_names: set[str],
                     rope_factors: torch.Tensor | None = None) -> Any:
    """The transformers config of a ``llama`` / ``qwen2`` GGUF from its metadata (the inverse of :func:`hparams`;
    ``general.name`` containing "mistral" gives a Mistral config, as transformers' GGUF loader decides); with
    `rope_factors` (the file's ``rope_freqs.weight``) Llama 3.1's RoPE scaling rebuilt from them."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    a = metadata.get("general.architecture")
    if a not in ("llama", "qwen2", "qwen3"):
        raise NotImplementedError(f"exporting from a GGUF of architecture {a!r} is not implemented; supported: llama, "
                                  "qwen2, qwen3 (give the model folder instead)")
    n_head = metadata[f"{a}.attention.head_count"]
    hidden = metadata[f"{a}.embedding_length"]
    kwargs: dict[str, Any] = {
        "vocab_size": metadata.get(f"{a}.vocab_size") or len(metadata["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": metadata[f"{a}.feed_forward_length"],
        "num_hidden_layers": metadata[f"{a}.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": metadata.get(f"{a}.attention.head_count_kv", n_head),
        "max_position_embeddings": metadata[f"{a}.context_length"],
        "rms_norm_eps": metadata[f"{a}.attention.layer_norm_rms_epsilon"],
        "rope_parameters": {"rope_type": "default", "rope_theta": metadata.get(f"{a}.rope.freq_base", 10000.0)},
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if a == "qwen2":
        return Qwen2Config(**kwargs)
    kwargs["head_dim"] = metadata.get(f"{a}.attention.key_length") or metadata.get(f"{a}.rope.dimension_count") \
        or hidden // n_head
    if a == "qwen3":
        return Qwen3Config(**kwargs)
    if "mistral" in str(metadata.get("general.name", "")).lower():
        config = MistralConfig(sliding_window=None, **kwargs)
    else:
        config = LlamaConfig(**kwargs)
    if rope_factors is not None:
        theta = kwargs["rope_parameters"]["rope_theta"]
        config.rope_parameters = llama3_rope_from_factors(rope_factors, theta, 2 * rope_factors.numel(), config)
    return config


def parameter_names(config: Any) -> list[str]:
    """The state-dict names of a Llama-family causal LM (the tensors a GGUF of it holds, in transformers' names)."""
    arch_spec(config)
    layer = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
             "mlp.up_proj.weight", "mlp.down_proj.weight"]
    if config.model_type == "qwen2":
        layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if config.model_type == "qwen3":
        layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in layer]
    return [*names, "model.norm.weight", "lm_head.weight"]
