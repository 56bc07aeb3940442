"""One benchmark configuration in one process: build a Llama-shaped model with random weights, add LoRA r=16
on all linear layers (lorakit, or transformers + PEFT [+ bitsandbytes]), train a few steps with activation
checkpointing, and print one ``RESULT {json}`` line: tokens/s, peak memory, and optionally the longest
sequence that fits at batch 1.

Run by ``bench/gpu/run.py`` (one process per configuration so memory peaks never mix); usable alone:

    python bench/gpu/worker.py --impl lorakit --model llama-3.2-1b --mode qlora --seq 2048 --batch 4
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
import warnings
from typing import Any

import torch
from torch import nn

# Shapes of the public configs (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B); weights are random.
MODELS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    # CPU toy: the same code paths at a size that runs in seconds.
    "toy": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=4096,
    ),
}  # fmt: skip
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = "all-linear"


def flops_per_token(spec: dict[str, Any], seq: int, r: int = LORA_R) -> float:
    """Model FLOPs per trained token for LoRA with activation checkpointing (the MFU numerator).

    N_layers = matmul weights of the decoder layers, N_head = the LM head (V x H), N_lora = adapter weights,
    d = heads x head_dim, L = layers, T = sequence length:

        6 N_layers   forward 2N + backward to the activations 2N (frozen weights get no weight gradient)
                     + recompute of the forward under checkpointing 2N
      + 4 N_head     forward + backward to the activations; the head is outside the checkpointed layers
      + 8 N_lora     forward 2 + activation grads 2 + weight grads 2 + recompute 2
      + 8 L T d      causal attention (QK^T and AV, halved by the mask): forward 2Td, backward 4Td, recompute 2Td
    """
    h, inter, layers = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    d_q = spec["num_attention_heads"] * spec["head_dim"]
    d_kv = spec["num_key_value_heads"] * spec["head_dim"]
    n_layers = layers * (h * d_q + 2 * h * d_kv + d_q * h + 3 * h * inter)
    n_head = spec["vocab_size"] * h
    io = [(h, d_q), (h, d_kv), (h, d_kv), (d_q, h), (h, inter), (h, inter), (inter, h)]
    n_lora = layers * r * sum(i + o for i, o in io)
    return 6 * n_layers + 4 * n_head + 8 * n_lora + 8 * layers * seq * d_q


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    return model


def _bnb_quantize(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """What transformers' bitsandbytes integration does at load time: every linear but lm_head -> Linear4bit."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(child.weight.device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
                del child
    gc.collect()


def setup_peft(model: nn.Module, mode: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """transformers + PEFT as most people run it (PEFT's QLoRA recipe: prepare_model_for_kbit_training)."""
    import peft

    if mode == "qlora":
        _bnb_quantize(model, dtype)
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.activation_checkpointing_enable({"use_reentrant": False})
    config = peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, config)

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return model, loss_fn


def setup_lorakit(model: nn.Module, mode: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """lorakit: its 4-bit layers, its LoRA wrappers, and the chunked LM-head loss."""
    from lorakit import LoraConfig, get_peft_model
    from lorakit.kernels.chunked_ce import causal_lm_loss

    if mode == "qlora":
        from lorakit.quant.config import BitsAndBytesConfig
        from lorakit.quant.load import quantize_model

        quantize_model(
            model,
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            ),
        )
        gc.collect()
    model.activation_checkpointing_enable({"use_reentrant": False})
    config = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.enable_fused_lora()  # fused LoRA linears and SwiGLU MLPs (lorakit.fused)

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(model, ids, ids, reduction="mean")

    return model, loss_fn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; the whole process


def _step(model: nn.Module, loss_fn: Any, opt: torch.optim.Optimizer, ids: torch.Tensor, offload: bool) -> float:
    from lorakit.kernels.offload import offload_activations

    with offload_activations(model=model, enabled=offload):
        loss = loss_fn(ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


class _NoTiming(Exception):
    """--steps 0: only the probe runs."""


def _env(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("transformers", "peft", "bitsandbytes", "lorakit", "triton"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    env["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return env


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["lorakit", "peft"], required=True)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--mode", choices=["lora16", "qlora"], required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (0: only --probe)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--offload", action="store_true", help="lorakit activation offloading (lorakit only)")
    p.add_argument(
        "--probe",
        type=int,
        nargs="*",
        default=[],
        help="after timing, sequence lengths to try at batch 1 (ascending; stops at the first OOM)",
    )
    args = p.parse_args()
    if args.offload and args.impl != "lorakit":
        raise ValueError("--offload is a lorakit feature; PEFT runs without it")
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)

    model = build_model(args.model, device, dtype)
    setup = setup_lorakit if args.impl == "lorakit" else setup_peft
    model, loss_fn = setup(model, args.mode, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vocab = MODELS[args.model]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    result: dict[str, Any] = dict(vars(args), trainable_params=sum(p.numel() for p in trainable), env=_env(device))
    try:
        if args.steps < 1:
            raise _NoTiming
        for _ in range(args.warmup):
            _step(model, loss_fn, opt, ids, args.offload)
        _sync(device)
        start = time.perf_counter()
        losses = [_step(model, loss_fn, opt, ids, args.offload) for _ in range(args.steps)]
        _sync(device)
        seconds = time.perf_counter() - start
        tokens_per_s = args.batch * args.seq * args.steps / seconds
        result.update(
            ok=True,
            seconds=seconds,
            tokens_per_s=tokens_per_s,
            peak_bytes=_peak_bytes(device),
            final_loss=losses[-1],
            model_flops_per_token=flops_per_token(MODELS[args.model], args.seq),
        )
    except _NoTiming:
        result.update(ok=True, tokens_per_s=None, peak_bytes=None)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        result.update(ok=False, error="out of memory")

    if args.probe:
        longest = 0
        for seq in args.probe:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                _step(model, loss_fn, opt, torch.randint(0, vocab, (1, seq), device=device), args.offload)
                _sync(device)
                longest = seq
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not _is_oom(err):
                    raise
                break
        result["longest_seq"] = longest
        result["longest_seq_capped"] = longest == args.probe[-1]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
