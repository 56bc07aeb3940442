"""The training loop of `lorakit train`: one function, read top to bottom.

Runs on `accelerate.Accelerator`, so the same code runs on one CPU/GPU or under `torchrun` /
`accelerate launch` with several processes (DDP). Every feature is switched by a field of
`lorakit.train.config.TrainConfig` (named in brackets below).

Loss normalization (token-level, not batch-level). One optimizer step sees the micro-batches
``m = 1..A`` (gradient_accumulation_steps) on each of the ``P`` processes. With ``N`` the number of label
tokens in all of them (summed over micro-batches and processes *before* the first backward) the step
minimizes

    loss = (1 / N) * sum_{p, m, t} CE(p, m, t)

so every label token weighs the same whatever the batch shapes, packing, accumulation or world size
(the fix of https://huggingface.co/blog/gradient_accumulation). Each process back-propagates
``P * sum_t CE / N`` because DDP averages gradients over the ``P`` processes.

Data order is a pure function of (seed, epoch, step): epoch ``e`` uses ``randperm(n, seed + e)``, cut into
global micro-batches of ``per_device_train_batch_size * P`` examples (an incomplete last one is dropped),
and process ``p`` takes its slice. So the data position is the step number, and a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.kernels.offload import offload_activations
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE_INDEX, build_datasets, collate, pack_examples
from lorakit.train.evaluate import (
    check_eval_file,
    exact_match,
    generation_examples,
    label_tokens,
    load_base_model,
    perplexity,
)
from lorakit.train.metrics import PLOT_FILE, SUMMARY_FILE, MetricsLogger, format_bytes, peak_memory_bytes
from lorakit.train.optim import build_optimizer, build_scheduler, param_groups

TRAINABLE_FILE = "trainable.safetensors"


class CausalLMLoss(nn.Module):
    """Wraps a (LoRA-wrapped) causal LM so that forward returns the *summed* token cross-entropy.

    DDP wraps this module, so the decoder-only path below still syncs gradients. With `chunked` the LM
    head and cross-entropy run in vocabulary chunks (`lorakit.kernels.chunked_ce`), never holding the
    (B*T, V) logits; otherwise `F.cross_entropy` on the model's logits.
    """

    def __init__(self, model: nn.Module, chunked: bool) -> None:
        super().__init__()
        self.model = model
        self.chunked = chunked

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        if self.chunked:
            from lorakit.kernels.chunked_ce import causal_lm_loss

            return causal_lm_loss(self.model, input_ids, labels, reduction="sum", **kwargs)
        logits = self.model(input_ids=input_ids, use_cache=False, **kwargs).logits  # (B, T, V)
        shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): t predicts t+1
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_loss_available(model: nn.Module) -> bool:
    try:
        from lorakit.kernels import chunked_ce  # noqa: F401
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "get_decoder") and type(base.get_output_embeddings()) is nn.Linear


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    summary: dict[str, Any] = field(default_factory=dict)


def _oom_message(err: BaseException) -> str:
    return (f"out of memory ({err.__class__.__name__}). Try, in this order: a smaller "
            "training.per_device_train_batch_size with a larger gradient_accumulation_steps (same global batch), "
            "training.gradient_checkpointing=true, a shorter training.max_seq_length, quantization=nf4 (QLoRA), "
            "training.bf16=true. `lorakit estimate MODEL --method qlora ...` shows where the memory goes.")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class TrainingError(ValueError):
    """A run that cannot go on for a reason the user can fix (out of memory, ...); printed without a traceback."""


LORA_KEYS_CHECKED = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_dora",
                     "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "bias",
                     "layers_to_transform", "layers_pattern", "fan_in_fan_out")
"""LoraConfig fields a resumed run must share with its checkpoint (they change the adapter or its maths)."""


def _lora_differences(mine: Any, saved: Any, keys: Any, model: nn.Module | None = None) -> list[str]:
    """`key: ours vs saved` for each of `keys` on which two LoraConfigs differ. target_modules is compared by
    the modules each selects in `model` (None: skipped), since "all-linear" is saved expanded."""
    from lorakit.inject import find_targets

    a, b = mine.to_dict(), saved.to_dict()
    diffs = []
    for key in keys:
        if key == "target_modules":
            if model is not None:
                ours, theirs = set(find_targets(model, mine)), set(find_targets(model, saved))
                if ours != theirs:
                    diffs.append(f"target_modules: {a[key]!r} selects {len(ours)} modules, the saved adapter "
                                 f"adapts {len(theirs)} (e.g. {sorted(ours ^ theirs)[:2]})")
        elif a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} here vs {b.get(key)!r} saved")
    return diffs


def _check_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to start a new run over an earlier one; returns the checkpoint to resume from (or None)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"training.output_dir={str(out_dir)!r} is an existing file; give a folder path")
    if resume:
        latest = ckpt.latest_checkpoint(out_dir)
        if latest is None and (out_dir / "adapter_config.json").is_file() and not overwrite:
            raise ValueError(f"--resume: training.output_dir={str(out_dir)!r} holds a finished adapter but no "
                             "checkpoint to resume from; starting again would replace it. Pick another "
                             "training.output_dir, or set training.overwrite_output_dir=true.")
        return latest
    earlier = [p.name for p in ckpt.checkpoint_dirs(out_dir)]
    if (out_dir / "adapter_config.json").is_file():
        earlier.append("adapter_config.json")
    if earlier and not overwrite:
        raise ValueError(
            f"training.output_dir={str(out_dir)!r} already holds a run ({', '.join(earlier[:4])}). Continue it "
            "with --resume (training.resume=true), pick another training.output_dir, or set "
            "training.overwrite_output_dir=true to replace it (its checkpoints and final adapter are deleted).")
    return None


def _earlier_outputs(out_dir: Path) -> list[Path]:
    """What an earlier run left in `out_dir` besides checkpoints and that a new run must not leave behind: its
    final adapter (which would load as this run's), summary, plot and TensorBoard events; adapter_config.json
    first, so a deletion cut short never leaves an adapter that loads."""
    names = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", SUMMARY_FILE, PLOT_FILE,
             "runs")
    return [out_dir / n for n in names if (out_dir / n).exists()]


def _check_inputs_outside(doomed: list[Path], inputs: dict[str, str | None], out_dir: Path) -> None:
    """Refuse to delete the earlier run's checkpoints and final adapter (``doomed``, resolved paths) when an
    input of this run lies in one, or is the earlier adapter in ``out_dir`` itself."""
    adapter_here = out_dir.resolve() / "adapter_config.json" in doomed
    for key, value in inputs.items():
        if not value or not Path(value).exists():
            continue
        path = Path(value).resolve()
        inside = next((d for d in doomed if d == path or d in path.parents), None)
        if inside is None and adapter_here and path == out_dir.resolve():
            inside = path
        if inside is not None:
            raise ValueError(
                f"{key}={value!r} lies in {str(inside)!r}, part of the earlier run in training.output_dir "
                "that training.overwrite_output_dir=true deletes before training. Copy it out of the output_dir "
                "first, or train into another training.output_dir.")


def _finished_summary(out_dir: Path, total_steps: int) -> dict[str, Any] | None:
    """The summary of a run in `out_dir` that wrote its final adapter at `total_steps`, else None."""
    path = out_dir / SUMMARY_FILE
    if not (out_dir / "adapter_config.json").is_file() or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    return summary if isinstance(summary, dict) and summary.get("global_step") == total_steps else None


def _check_resume_state(state: dict[str, Any], where: Path, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with another world size, step count or data order."""
    for key, value in expected.items():
        if key in state and state[key] != value:
            raise ValueError(
                f"cannot resume from {where}: it was written with {key}={state[key]!r}, this run has {value!r} "
                "(it would see other batches / another schedule, or the optimizer and schedule restored from the "
                "checkpoint would override it). Resume with the same config and number of processes, or start a "
                f"new run from its adapter (model.adapter_name_or_path={str(where)!r}, another "
                "training.output_dir).")
    if "total_steps" in expected and state["global_step"] > expected["total_steps"]:
        raise ValueError(f"cannot resume from {where}: it is at step {state['global_step']}, past this run's "
                         f"{expected['total_steps']} steps")


def train(cfg: TrainConfig, resume: bool | None = None) -> TrainResult:
    """Fine-tune `cfg.model` with the LoRA adapter `cfg.lora` on `cfg.data`; write everything to output_dir.

    Steps: (1) accelerator and seed, (2) base model [quantization], (3) data [packing, max_seq_length],
    (4) adapter [lora, model.adapter_name_or_path], [gradient_checkpointing], [fused_lora], (5) optimizer [optim,
    weight_decay, adam_*] and schedule [lr_scheduler_type, warmup_ratio/steps], (6) resume [resume],
    (7) exact match before training [evaluation.path], (8) the loop: token-normalized loss over
    [gradient_accumulation_steps] and processes, autocast [bf16/fp16], [offload_activations], clipping
    [max_grad_norm], logging
    [logging_steps], eval loss and perplexity [eval_steps], checkpoints [save_steps, save_total_limit],
    (9) final eval, adapter, tokenizer, plot and summary, exact match after training (reloaded from disk).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = cfg.training
    resume = t.resume if resume is None else resume
    out_dir = Path(t.output_dir)

    # 1. accelerator, seed ------------------------------------------------------------------------------
    if t.fp16 and not torch.cuda.is_available():
        raise ValueError("training.fp16=true needs a CUDA GPU; on CPU use training.bf16=true")
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    # cpu=True on a machine without CUDA: accelerate only enters MULTI_CPU (gloo) mode under torchrun with it
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(t.seed)
    say = accelerator.print
    m = cfg.model
    if os.path.isdir(m.name_or_path) and Path(m.name_or_path).resolve() == out_dir.resolve():
        raise ValueError(f"training.output_dir={str(out_dir)!r} is the model folder (model.name_or_path): the adapter, "
                         "tokenizer and logs would be written into it, and transformers would then load that model "
                         "with the adapter attached. Pick another training.output_dir.")
    resume_from = _check_output_dir(out_dir, resume, t.overwrite_output_dir)
    if main:  # an unwritable output_dir fails now, not when the first file is written after the model loaded
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"training.output_dir={str(out_dir)!r} cannot be created: {err.strerror or err}") from err
    user_lora = cfg.lora_config()
    adapter_cfg = None
    if m.adapter_name_or_path:  # the adapter brings its own config: the lora section must agree with it
        from lorakit.config import LoraConfig

        adapter_cfg = LoraConfig.from_pretrained(m.adapter_name_or_path)
        diffs = _lora_differences(user_lora, adapter_cfg, [k for k in cfg.lora if k != "task_type"])
        if diffs:
            raise ValueError(f"model.adapter_name_or_path={m.adapter_name_or_path!r} brings its own LoRA config, "
                             f"and the lora section differs from it: {'; '.join(diffs)}. Remove these lora keys "
                             "(or start a fresh adapter without model.adapter_name_or_path).")
    state: dict[str, Any] = {}
    ckpt_cfg = None
    if resume_from is not None:
        from lorakit.config import LoraConfig

        state = ckpt.read_state(resume_from)
        _check_resume_state(state, resume_from, {"world_size": world})
        ckpt_cfg = LoraConfig.from_pretrained(resume_from)
        diffs = _lora_differences(adapter_cfg or user_lora, ckpt_cfg, LORA_KEYS_CHECKED)
        if diffs:
            raise ValueError(f"cannot resume from {resume_from}: its adapter differs from this config's "
                             f"({'; '.join(diffs)}). Resume with the config of that run, or start a new "
                             "training.output_dir.")
    ev = cfg.evaluation
    if t.overwrite_output_dir and not resume:
        doomed = [d.resolve() for d in [*_earlier_outputs(out_dir), *ckpt.checkpoint_dirs(out_dir)]]
        _check_inputs_outside(doomed, {
            "model.name_or_path": m.name_or_path, "model.adapter_name_or_path": m.adapter_name_or_path,
            "data.path": cfg.data.path, "data.validation_path": cfg.data.validation_path, "evaluation.path": ev.path,
        }, out_dir)
        if main:
            for old in doomed:
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
    if ev.path:  # a wrong eval file fails now, not after the model has loaded
        check_eval_file(ev.path, cfg.data, ev.prompt_field, ev.answer_field)
    if t.offload_activations and not torch.cuda.is_available():
        say("[lorakit] training.offload_activations=true does nothing here: it offloads CUDA activations "
            "only, and this run is on CPU")

    # 2. base model -------------------------------------------------------------------------------------
    model, tokenizer = load_base_model(m.name_or_path, m.torch_dtype, cfg.quantization, m.attn_implementation,
                                       m.revision, m.trust_remote_code, device=accelerator.device)

    # 3. data -------------------------------------------------------------------------------------------
    train_ex, eval_ex, data_stats = build_datasets(cfg.data, tokenizer, t.max_seq_length)
    if t.packing:
        train_ex = pack_examples(train_ex, t.max_seq_length)
        eval_ex = pack_examples(eval_ex, t.max_seq_length) if eval_ex else eval_ex
    mask_dtype = next(model.parameters()).dtype if m.torch_dtype != "float32" else torch.float32
    if not mask_dtype.is_floating_point:
        mask_dtype = torch.float32
    dropped = {split: data_stats.get(f"{split}_dropped_no_labels", 0) for split in ("train", "eval")}
    say(f"[lorakit] data: {data_stats['train_examples']} train examples ({data_stats['format']}), "
        f"{data_stats['train_truncated']} truncated to {t.max_seq_length} tokens"
        + (f", {len(train_ex)} packed rows" if t.packing else "")
        + (f"; {len(eval_ex)} eval rows" if eval_ex else ""))
    if dropped["train"] or dropped["eval"]:
        say("[lorakit] data: dropped " + " and ".join(
            f"{dropped[s]} of {data_stats[f'{s}_records']} {s} records" for s in ("train", "eval") if dropped[s])
            + f" with no answer token left: training.max_seq_length={t.max_seq_length} cuts the answer off (or "
            "it is empty). Raise training.max_seq_length (`lorakit preprocess CONFIG` shows the counts)")

    bs, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    global_micro = bs * world
    micro_per_epoch = len(train_ex) // global_micro
    if micro_per_epoch == 0:
        raise ValueError(f"{len(train_ex)} training rows are fewer than one global batch "
                         f"(training.per_device_train_batch_size={bs} x {world} processes): lower "
                         f"training.per_device_train_batch_size to at most {len(train_ex) // world} (and raise "
                         "gradient_accumulation_steps to keep the global batch), or give more data")
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    data_order = {"total_steps": total_steps, "seed": t.seed, "per_device_train_batch_size": bs,
                  "gradient_accumulation_steps": accum, "train_rows": len(train_ex),
                  # the optimizer and the schedule come back from the checkpoint: changed values would not apply
                  "learning_rate": t.learning_rate, "lr_scheduler_type": t.lr_scheduler_type,
                  "warmup_steps_resolved": warmup, "optim": t.optim, "weight_decay": t.weight_decay,
                  "adam_betas": [t.adam_beta1, t.adam_beta2], "adam_epsilon": t.adam_epsilon,
                  # the examples behind each step, and the weights the adapter was trained against
                  "max_seq_length": t.max_seq_length, "packing": t.packing,
                  "train_on_inputs": cfg.data.train_on_inputs, "quantization": cfg.quantization.method,
                  "base_model": os.path.abspath(m.name_or_path) if os.path.exists(m.name_or_path) else m.name_or_path}
    if resume_from is not None:
        _check_resume_state(state, resume_from, data_order)
        finished = _finished_summary(out_dir, total_steps) if state["global_step"] == total_steps else None
        if finished is not None:  # rerunning would rewrite its summary as a 0-step run
            say(f"[lorakit] --resume: {out_dir} holds this run, finished at step {total_steps} (adapter, "
                f"{SUMMARY_FILE}); nothing to do. To train on, start a new run from its adapter "
                f"(model.adapter_name_or_path={str(out_dir)!r}, another training.output_dir).")
            return TrainResult(out_dir, total_steps, finished.get("final_train_loss"),
                               finished.get("final_eval_loss"), finished)
    if t.eval_steps and not eval_ex:
        say(f"[lorakit] training.eval_steps={t.eval_steps} is ignored: there is no eval data (set "
            "data.validation_path or data.val_set_size)")

    # 4. adapter ----------------------------------------------------------------------------------------
    from lorakit import PeftModel, get_peft_model

    if cfg.quantization.method != "none":  # freeze, norms to fp32 (lorakit.quant.prepare)
        from lorakit.quant.prepare import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    elif t.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it (and its kwarg)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter_cfg is not None and "target_modules" in cfg.lora:
        diffs = _lora_differences(user_lora, adapter_cfg, ["target_modules"], model)
        if diffs:
            raise ValueError(f"model.adapter_name_or_path={m.adapter_name_or_path!r}: {diffs[0]}. Remove "
                             "lora.target_modules (the adapter's own are used).")
    if ckpt_cfg is not None:
        diffs = _lora_differences(adapter_cfg or user_lora, ckpt_cfg, ["target_modules"], model)
        if diffs:
            raise ValueError(f"cannot resume from {resume_from}: {diffs[0]}. Resume with the config of that "
                             "run, or start a new training.output_dir.")
    if m.adapter_name_or_path:
        model = PeftModel.from_pretrained(model, m.adapter_name_or_path, is_trainable=True)
    else:
        model = get_peft_model(model, cfg.lora_config())
    if t.fused_lora:
        model.enable_fused_lora()
    for p in model.parameters():  # adapters train in fp32 even on a bf16 / 4-bit base
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in trainable.values())
    n_all = sum(p.numel() for p in model.parameters())
    say(f"[lorakit] trainable params: {n_trainable:,} || all params: {n_all:,} || "
        f"trainable%: {100 * n_trainable / n_all:.4f}")

    # 5. optimizer and schedule ---------------------------------------------------------------------------
    chunked = t.use_chunked_loss and _chunked_loss_available(model)
    loss_module = CausalLMLoss(model, chunked)
    optimizer = build_optimizer(t.optim, param_groups(model, t.weight_decay), t.learning_rate,
                                (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    scheduler = build_scheduler(optimizer, total_steps, warmup, t.lr_scheduler_type)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)

    # 6. resume -----------------------------------------------------------------------------------------
    start_step, resumed_from = 0, resume_from
    tokens_seen = 0  # non-padding input tokens (prompts included) since step 0, all processes
    window = torch.zeros(2, dtype=torch.float64)  # (sum CE, label tokens) since the last log line
    last_train_loss = None
    if main:
        ckpt.clean_temporaries(out_dir)
    if resume and resumed_from is None:
        say(f"[lorakit] --resume: no complete checkpoint in {out_dir}; starting from step 0")
    if resumed_from is not None:
        saved = load_file(resumed_from / TRAINABLE_FILE)
        if set(saved) != set(trainable):
            raise ValueError(f"{resumed_from} does not match this config's adapter: trainable tensors "
                             f"differ (e.g. {sorted(set(saved) ^ set(trainable))[:3]})")
        shapes = [n for n in saved if saved[n].shape != trainable[n].shape]
        if shapes:
            raise ValueError(f"{resumed_from} does not match this config's adapter: {shapes[0]} has shape "
                             f"{tuple(saved[shapes[0]].shape)} there, {tuple(trainable[shapes[0]].shape)} here")
        with torch.no_grad():
            for name, value in saved.items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(torch.load(resumed_from / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(resumed_from / "scheduler.pt", weights_only=True))
        ckpt.load_rng(resumed_from, rank)
        start_step = state["global_step"]
        tokens_seen = state.get("tokens_seen", 0)
        window = torch.tensor(state.get("log_window", [0.0, 0.0]), dtype=torch.float64)
        last_train_loss = state.get("last_train_loss")
        say(f"[lorakit] resumed from {resumed_from} at step {start_step}/{total_steps}")
    if main:
        cfg.save(out_dir)
    logger = MetricsLogger(out_dir, main, tensorboard=t.report_to != "none",
                           resume_step=start_step if resumed_from else None)
    if main and not resumed_from:
        logger.log(0, {f"data_{k}": v for k, v in data_stats.items()})

    # 7. exact match before training --------------------------------------------------------------------
    gen_examples, before = None, None
    if ev.path and main:
        gen_examples, skipped = generation_examples(ev.path, cfg.data, tokenizer, ev.max_examples,
                                                    t.max_seq_length, data_stats["format"], ev.prompt_field,
                                                    ev.answer_field)
        if skipped:
            say(f"[lorakit] exact match: skipped {skipped} of {skipped + len(gen_examples)} evaluation records "
                f"whose answer is cut off by training.max_seq_length={t.max_seq_length}")
        if not resumed_from:
            with model.disable_adapter():
                before, _ = exact_match(model, tokenizer, gen_examples, ev.max_new_tokens, ev.batch_size)
            say(f"[lorakit] exact match BEFORE training: {before:.1%} on {len(gen_examples)} held-out prompts")

    def batch_of(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = collate(rows, tokenizer.pad_token_id, t.packing, mask_dtype)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def micro_batches(step: int) -> list[tuple[dict[str, torch.Tensor], int]]:
        """This process's (micro-batch, real tokens) of optimizer step `step`: a function of (seed, step)."""
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(t.seed + epoch))
        out = []
        for micro in range(k * accum, min((k + 1) * accum, micro_per_epoch)):
            idx = perm[micro * global_micro + rank * bs : micro * global_micro + (rank + 1) * bs]
            rows = [train_ex[i] for i in idx.tolist()]
            out.append((batch_of(rows), sum(len(r["input_ids"]) for r in rows)))
        return out

    @torch.no_grad()
    def evaluate() -> float:
        loss_module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum CE, tokens)
        rows = eval_ex[rank::world]
        for start in range(0, len(rows), t.per_device_eval_batch_size):
            batch = batch_of(rows[start : start + t.per_device_eval_batch_size])
            with accelerator.autocast():
                total[0] += loss_module(**batch).double()
            total[1] += label_tokens(batch["labels"])
        loss_module.train()
        total = accelerator.reduce(total, "sum")
        return (total[0] / total[1].clamp(min=1)).item()

    def save_checkpoint(step: int) -> None:
        tmp = ckpt.temp_dir(out_dir, step)
        if main:
            ckpt.begin(out_dir, step)
        accelerator.wait_for_everyone()
        ckpt.save_rng(tmp, rank)
        if main:
            unwrapped = accelerator.unwrap_model(loss_module).model
            unwrapped.save_pretrained(tmp)
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, tmp / TRAINABLE_FILE)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            ckpt.commit(tmp, {"global_step": step, "epoch": step / steps_per_epoch, "world_size": world,
                              **data_order, "tokens_seen": tokens_seen, "log_window": window.tolist(),
                              "last_train_loss": last_train_loss})
            ckpt.rotate(out_dir, t.save_total_limit)
        accelerator.wait_for_everyone()

    # 8. the loop ---------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not main or t.disable_tqdm, dynamic_ncols=True,
               desc="train")
    loss_module.train()
    run_tokens = 0  # tokens of this run (throughput)
    eval_loss = None
    t_start = time.perf_counter()
    try:
        for step in range(start_step, total_steps):
            batches = micro_batches(step)
            # N: label tokens of this step over all micro-batches and processes, before any backward
            counts = torch.tensor([[label_tokens(b["labels"]), n] for b, n in batches]).sum(0)  # (labels, tokens)
            n_global, n_tokens = accelerator.reduce(counts.to(accelerator.device), "sum").tolist()
            tokens_seen += n_tokens
            run_tokens += n_tokens
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for i, (batch, _) in enumerate(batches):
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(loss_module)
                with sync, accelerator.autocast(), offload_activations(enabled=t.offload_activations):
                    loss_sum = loss_module(**batch)  # sum of token CE on this micro-batch
                    accelerator.backward(loss_sum * world / max(1, n_global))
                step_loss += loss_sum.detach().double()
            grad_norm = None
            if t.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(list(trainable.values()), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss = accelerator.reduce(step_loss, "sum").cpu()
            window += torch.stack([step_loss, torch.tensor(float(n_global), dtype=torch.float64)])
            done = step + 1
            elapsed = time.perf_counter() - t_start
            tok_s = run_tokens / max(elapsed, 1e-9)
            if done % t.logging_steps == 0 or done == total_steps:
                last_train_loss = (window[0] / window[1].clamp(min=1)).item()
                window.zero_()
                record = {"train_loss": last_train_loss, "learning_rate": scheduler.get_last_lr()[0],
                          "epoch": done / steps_per_epoch, "tokens_per_s": tok_s}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                logger.log(done, record)
                bar.set_postfix(loss=f"{last_train_loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                                tok_s=f"{tok_s:.0f}", mem=format_bytes(peak_memory_bytes()), refresh=False)
            if eval_ex and t.eval_steps and done % t.eval_steps == 0 and done != total_steps:
                eval_loss = evaluate()
                logger.log(done, {"eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)})
                say(f"\n[lorakit] step {done}: eval_loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}")
            if t.save_steps and done % t.save_steps == 0:
                save_checkpoint(done)
            bar.update(1)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if _is_oom(err):
            raise TrainingError(_oom_message(err)) from err
        raise
    finally:
        bar.close()
    train_time = time.perf_counter() - t_start

    # 9. final eval, adapter, tokenizer, plot, summary ----------------------------------------------------
    if eval_ex:
        eval_loss = evaluate()
        logger.log(total_steps, {"eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)})
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if main:
        final = accelerator.unwrap_model(loss_module).model
        final.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        logger.plot(out_dir)
        summary = {
            "global_step": total_steps, "train_steps_this_run": total_steps - start_step,
            "train_time_s": round(train_time, 2), "tokens_per_s": round(run_tokens / max(train_time, 1e-9), 1),
            "peak_memory_bytes": peak_memory_bytes(), "final_train_loss": last_train_loss,
            "final_eval_loss": eval_loss, "final_eval_perplexity": perplexity(eval_loss) if eval_loss else None,
            "world_size": world, "trainable_params": n_trainable, "chunked_loss": chunked,
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
    logger.close()
    if main and gen_examples is not None:
        after, pairs = _exact_match_reloaded(cfg, out_dir, gen_examples, accelerator.device)
        summary.update({"exact_match_before": before, "exact_match_after": after})
        say(f"[lorakit] exact match AFTER training:  {after:.1%} on {len(gen_examples)} held-out prompts "
            f"(before: {before:.1%})" if before is not None else
            f"[lorakit] exact match AFTER training:  {after:.1%} on {len(gen_examples)} held-out prompts")
        for gen, exp in pairs[: ev.generate_samples]:
            say(f"    generated {gen.strip()!r:<40} expected {exp.strip()!r}")
    if main:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        say(f"[lorakit] done: {total_steps - start_step} steps in {train_time:.1f} s, "
            f"{summary['tokens_per_s']:.0f} tokens/s, peak memory {format_bytes(summary['peak_memory_bytes'])}, "
            f"train loss {last_train_loss if last_train_loss is None else round(last_train_loss, 4)}, "
            f"eval loss {eval_loss if eval_loss is None else round(eval_loss, 4)}; adapter in {out_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, total_steps, last_train_loss, eval_loss, summary)


def _exact_match_reloaded(cfg: TrainConfig, out_dir: Path, examples: list, device: torch.device
                          ) -> tuple[float, list[tuple[str, str]]]:
    """Reload base + saved adapter from disk (what a user would do) and run the exact-match check."""
    from lorakit import PeftModel

    m = cfg.model
    base, tokenizer = load_base_model(m.name_or_path, m.torch_dtype, cfg.quantization, m.attn_implementation,
                                      m.revision, m.trust_remote_code, device=device)
    model = PeftModel.from_pretrained(base, str(out_dir))
    ev = cfg.evaluation
    return exact_match(model, tokenizer, examples, ev.max_new_tokens, ev.batch_size)
