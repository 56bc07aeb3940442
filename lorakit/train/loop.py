"""The training loop of `lorakit train`: one function, read top to bottom.

Runs on `accelerate.Accelerator`, so the same code runs on one CPU/GPU or under `torchrun` /
`accelerate launch` with several processes: DDP, or FSDP2 with ``training.distributed: fsdp``
(`lorakit.train.distributed`: the model sharded, loaded and saved shard by shard). Every feature is switched by a
field of `lorakit.train.config.TrainConfig` (named in brackets below). Refusals live in `lorakit.train.plan`,
checkpoint files in `lorakit.train.checkpoint`, the loss in the training method (`lorakit.train.method`; SFT
today).

Loss normalization (unit-level, not batch-level; units are label tokens for SFT). One optimizer step sees the
micro-batches ``m = 1..A`` (gradient_accumulation_steps) on each of the ``P`` processes. With ``N`` the number of
units in all of them (summed over micro-batches and processes *before* the first backward) the step minimizes

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.kernels.offload import offload_activations
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed as fsdp
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import exact_match, generation_examples, load_base_model, perplexity
from lorakit.train.method import Row, TrainingMethod, build_method
from lorakit.train.metrics import SUMMARY_FILE, MetricsLogger, format_bytes, json_safe, peak_memory_bytes
from lorakit.train.optim import build_optimizer, build_scheduler, param_groups
from lorakit.train.plan import RunPlan, Schedule, data_fingerprint, mixed_precision, prepare_run
from lorakit.train.signals import StopOnSignal, TrainingInterrupted


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    eval_loss: float | None
    summary: dict[str, Any] = field(default_factory=dict)


class TrainingError(ValueError):
    """A run that cannot go on for a reason the user can fix (out of memory, ...); printed without a traceback."""


def _oom_message(err: BaseException) -> str:
    return (f"out of memory ({err.__class__.__name__}). Try, in this order: a smaller "
            "training.per_device_train_batch_size with a larger gradient_accumulation_steps (same global batch), "
            "training.gradient_checkpointing=true, a shorter training.max_seq_length, quantization=nf4 (QLoRA), "
            "training.bf16=true. `lorakit estimate MODEL --method qlora ...` shows where the memory goes.")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass
class Progress:
    """What the loop carries from step to step; a checkpoint saves it and a resumed run starts from it."""

    step: int = 0
    tokens_seen: int = 0
    """Non-padding input tokens (prompts included) since step 0, all processes."""
    window: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    """(sum loss, units) since the last log line."""
    last_train_loss: float | None = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(state["global_step"], state.get("tokens_seen", 0),
                   torch.tensor(state.get("log_window", [0.0, 0.0]), dtype=torch.float64),
                   state.get("last_train_loss"))

    def state(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "log_window": self.window.tolist(),
                "last_train_loss": self.last_train_loss}

    def add(self, loss_sum: torch.Tensor, units: float) -> None:
        self.window += torch.stack([loss_sum, torch.tensor(float(units), dtype=torch.float64)])

    def close_window(self) -> float | None:
        """The mean loss per unit since the last log line (None: no update since), and an empty window."""
        if self.window[1] <= 0:
            return None
        self.last_train_loss = (self.window[0] / self.window[1]).item()
        self.window.zero_()
        return self.last_train_loss


def step_rows(rows: list[Row], sched: Schedule, seed: int, step: int, rank: int) -> list[list[Row]]:
    """This process's micro-batches (lists of rows) of optimizer step `step`: a function of (seed, step).

    Epoch ``e`` uses ``randperm(n, seed + e)``, cut into global micro-batches of ``batch_size * world`` rows;
    process ``rank`` takes its slice of each.
    """
    epoch, k = divmod(step, sched.steps_per_epoch)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
    size, out = sched.batch_size * sched.world, []
    for micro in range(k * sched.accum, min((k + 1) * sched.accum, sched.micro_per_epoch)):
        idx = perm[micro * size + rank * sched.batch_size : micro * size + (rank + 1) * sched.batch_size]
        out.append([rows[i] for i in idx.tolist()])
    return out


def _attach_adapter(model: nn.Module, plan: RunPlan) -> nn.Module:
    """Prepare the base [quantization, gradient_checkpointing], add the adapter [lora,
    model.adapter_name_or_path], [fused_lora]; adapters train in fp32 even on a bf16 / 4-bit base."""
    from lorakit import PeftModel, get_peft_model

    t = plan.cfg.training
    if plan.cfg.quantization.method != "none":  # freeze, norms to fp32 (lorakit.quant.prepare)
        from lorakit.quant.prepare import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    elif t.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it (and its kwarg)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan.check_targets(model)
    if plan.new_adapter is None:
        model = PeftModel.from_pretrained(model, plan.cfg.model.adapter_name_or_path, is_trainable=True)
    else:
        model = get_peft_model(model, plan.new_adapter)
    if t.fused_lora:
        model.enable_fused_lora()
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def train(cfg: TrainConfig, resume: bool | None = None) -> TrainResult:
    """Fine-tune `cfg.model` with the LoRA adapter `cfg.lora` on `cfg.data`; write everything to output_dir.

    Steps: (1) accelerator, seed and the run's plan (`lorakit.train.plan`: every refusal, the output_dir's lock,
    stale temporary folders cleaned), (2) base model [quantization], (3) data of the [method]
    (`lorakit.train.method`; SFT: [packing, max_seq_length]; dpo, orpo, kto, simpo: `lorakit.train.preference`
    [preference.*]), (4) adapter [lora, model.adapter_name_or_path], [gradient_checkpointing], [fused_lora],
    [distributed] (fsdp: meta base, then sharded and each process's rows read), (5) optimizer [optim,
    weight_decay, adam_*] and schedule [lr_scheduler_type, warmup_ratio/steps], (6) resume [resume], (7) exact
    match before training [evaluation.path], or the method's eval metrics before training (preference accuracy),
    (8) the loop: unit-normalized loss over
    [gradient_accumulation_steps] and processes, autocast [bf16/fp16], [offload_activations], clipping
    [max_grad_norm], a stop at a non-finite loss or gradient norm [nonfinite_patience], logging [logging_steps],
    eval loss [eval_steps], checkpoints [save_steps, save_total_limit], SIGINT / SIGTERM (finish the step,
    checkpoint, raise `TrainingInterrupted`), (9) final eval, adapter, tokenizer, plot and summary, exact match
    after training (reloaded from disk).
    """
    from accelerate.utils import set_seed

    accelerator = _accelerator(cfg.training)
    set_seed(cfg.training.seed)
    main = accelerator.is_main_process
    plan = prepare_run(cfg, resume, accelerator.num_processes, main, lock=main)
    try:
        with StopOnSignal() as stop:
            return _run(plan, accelerator, stop)
    finally:
        plan.release()


ENGINES_OF_ACCELERATE = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED",
                         "Megatron-LM": "ACCELERATE_USE_MEGATRON_LM"}
"""accelerate's own sharding engines and the variables `accelerate launch` sets for them (refused by `train`)."""


def _accelerator(t: Any) -> Any:
    """accelerate's `Accelerator` for training.bf16 / fp16; a clear error when this process already made one with
    another precision (accelerate keeps the first run's settings for the life of the process: a notebook)."""
    from accelerate import Accelerator

    for engine, flag in ENGINES_OF_ACCELERATE.items():
        if os.environ.get(flag, "false").lower() in ("1", "true"):
            raise ValueError(
                f"`accelerate launch` was given a config that turns on accelerate's {engine} ({flag}=true), which "
                f"lorakit train does not use: it runs DDP, or shards the model itself with `training.distributed: "
                f"fsdp` in the YAML. Launch with a config whose distributed_type is MULTI_GPU (or MULTI_CPU), or with "
                f"torchrun, and set training.distributed in the YAML")
    # cpu=True on a machine without CUDA: accelerate only enters MULTI_CPU (gloo) mode under torchrun with it
    try:
        return Accelerator(mixed_precision=mixed_precision(t), cpu=not torch.cuda.is_available())
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise ValueError(f"this Python process already trained with another precision (accelerate keeps one "
                         f"mixed-precision setting per process); training.bf16={t.bf16} / training.fp16={t.fp16} "
                         "needs a new process: run `lorakit train CONFIG`, or restart the notebook kernel") from None


def _run(plan: RunPlan, accelerator: Any, stop: StopOnSignal) -> TrainResult:
    """Steps 1-9 of `train` once the plan holds (its docstring); `stop` notes SIGINT / SIGTERM until the loop ends."""
    from tqdm.auto import tqdm

    cfg, out_dir = plan.cfg, plan.out_dir
    t, m, ev = cfg.training, cfg.model, cfg.evaluation
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    say = accelerator.print
    if main:
        plan.clear_earlier_run()
        ckpt.clean_temporaries(out_dir)
    _say_notices(plan, say)

    # 2. base model, 3. data ----------------------------------------------------------------------------------
    source = None  # [distributed]: the (folder, dtype) each process reads its shards from after sharding (step 5)
    if plan.fsdp:  # parameters on meta
        model, tokenizer, *source = fsdp.empty_base_model(
            m.name_or_path, m.torch_dtype, cfg.quantization, m.attn_implementation, m.revision, m.trust_remote_code)
    else:
        model, tokenizer = load_base_model(m.name_or_path, m.torch_dtype, cfg.quantization, m.attn_implementation,
                                           m.revision, m.trust_remote_code, device=accelerator.device)
    mask_dtype = next(model.parameters()).dtype if m.torch_dtype != "float32" else torch.float32
    method = build_method(cfg, tokenizer, mask_dtype if mask_dtype.is_floating_point else torch.float32)
    train_rows, eval_rows, data_stats = method.build_data(say)
    sched = plan.schedule(len(train_rows), bool(eval_rows), data_fingerprint(train_rows))
    finished = plan.finished_summary(sched.total_steps)
    if finished is not None:
        say(f"[lorakit] --resume: {out_dir} holds this run, finished at step {sched.total_steps} (adapter, "
            f"{SUMMARY_FILE}); nothing to do. To train on, start a new run from its adapter "
            f"(model.adapter_name_or_path={str(out_dir)!r}, another training.output_dir).")
        return TrainResult(out_dir, sched.total_steps, finished.get("final_train_loss"),
                           finished.get("final_eval_loss"), finished)
    _say_notices(plan, say)

    # 4. adapter, 5. optimizer and schedule ----------------------------------------------------------------------
    model, loss_module, sharded, n_trainable = _adapted_model(model, plan, method, say, accelerator.device, source)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    method.precompute(loss_module, collective=sharded is not None)  # [method]: e.g. reference log-probs
    optimizer = build_optimizer(t.optim, param_groups(model, t.weight_decay), t.learning_rate,
                                (t.adam_beta1, t.adam_beta2), t.adam_epsilon)
    scheduler = build_scheduler(optimizer, sched.total_steps, sched.warmup, t.lr_scheduler_type)
    if sharded is None:
        loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    else:
        optimizer = accelerator.prepare(optimizer)

    # 6. resume -----------------------------------------------------------------------------------------------
    progress, resumed_from = Progress(), plan.resume_from
    if plan.resume and resumed_from is None:
        say(f"[lorakit] --resume: no complete checkpoint in {out_dir}; starting from step 0")
    if resumed_from is not None:
        ckpt.restore(resumed_from, trainable, optimizer, scheduler, rank, sharded)
        progress = Progress.from_state(plan.state)
        say(f"[lorakit] resumed from {resumed_from} at step {progress.step}/{sched.total_steps}")
    start_step = progress.step
    if main:
        cfg.save(out_dir)
    logger = MetricsLogger(out_dir, main, tensorboard=t.report_to != "none",
                           resume_step=start_step if resumed_from else None,
                           resume_records=plan.state.get("metrics_records"))
    if main and not resumed_from:
        logger.log(0, {f"data_{k}": v for k, v in data_stats.items()})

    # 7. exact match before training -------------------------------------------------------------------------
    gen_examples, before = None, None
    if ev.path and (main or sharded is not None):  # FSDP: every process generates its share with its shards
        gen_examples, before = _exact_match_before(cfg, model, tokenizer, data_stats.get("format"),
                                                   resumed_from is None, say,
                                                   None if sharded is None else loss_module)

    def batches_of(step: int) -> list[tuple[dict[str, torch.Tensor], int]]:
        return [({k: v.to(accelerator.device) for k, v in method.collate(rows).items()}, method.tokens(rows))
                for rows in step_rows(train_rows, sched, t.seed, step, rank)]

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(x.to(accelerator.device), "sum")

    def evaluate(step: int, split: str = "eval") -> dict[str, float]:
        loss = _evaluate(accelerator, loss_module, method, eval_rows[rank::world], t.per_device_eval_batch_size,
                         filler=eval_rows[:1] if sharded else None)
        record = {"eval_loss": loss, **({"eval_perplexity": perplexity(loss)} if method.reports_perplexity else {}),
                  **method.pop_metrics(split, reduce)}
        logger.log(step, record)
        return record

    def save_checkpoint(step: int) -> Path:
        _check_finite(trainable, f"checkpoint-{step}")
        state = {"epoch": step / sched.steps_per_epoch, "world_size": world, **sched.data_order, **progress.state(),
                 "metrics_records": len(logger.records)}
        ckpt.save(out_dir, step, accelerator.unwrap_model(loss_module).model, trainable, optimizer, scheduler,
                  state, rank, main, accelerator.wait_for_everyone, t.save_total_limit, sharded)
        return ckpt.checkpoint_path(out_dir, step)

    if eval_rows and method.eval_before and resumed_from is None:  # [method]: e.g. preference accuracy at step 0
        before = evaluate(0, "before")
        say("[lorakit] held-out BEFORE training: " + ", ".join(f"{k} {v:.4g}" for k, v in before.items()))

    # 8. the loop ---------------------------------------------------------------------------------------------
    bar = tqdm(total=sched.total_steps, initial=start_step, disable=not main or t.disable_tqdm,
               dynamic_ncols=True, desc="train")
    loss_module.train()
    run_tokens, eval_loss, bad_steps = 0, None, 0  # run_tokens: tokens of this run (throughput)
    t_start = time.perf_counter()
    try:
        if signum := _stop_signal(accelerator, stop.signum):  # a signal while loading: nothing new to save
            raise TrainingInterrupted(signum, start_step, None)
        for step in range(start_step, sched.total_steps):
            step_loss, n_units, n_tokens = _forward_backward(accelerator, loss_module, method, batches_of(step),
                                                             t.offload_activations, sharded)
            grad_norm = None
            if t.max_grad_norm > 0:
                clip = accelerator.clip_grad_norm_ if sharded is None else sharded.clip_grad_norm_
                grad_norm = clip(list(trainable.values()), t.max_grad_norm)
            progress.step = done = step + 1
            bad = _nonfinite(step_loss / max(n_units, 1), None if t.fp16 else grad_norm)  # fp16: scaler skips inf
            if bad is None:
                optimizer.step()
                bad_steps = 0
                progress.add(step_loss, n_units)
            else:  # the update is skipped; past the patience the run stops, saving nothing from this step
                bad_steps += 1
                logger.log(done, {"train_loss": (step_loss / max(n_units, 1)).item(), "nonfinite": bad[0]})
                if bad_steps > t.nonfinite_patience:
                    raise TrainingError(_divergence_message(bad, done, scheduler.get_last_lr()[0], start_step,
                                                            t, ckpt.latest_checkpoint(out_dir)))
                say(f"\n[lorakit] step {done}: the {bad[0]} is {bad[1]}; update skipped ({bad_steps} of "
                    f"training.nonfinite_patience={t.nonfinite_patience})")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.tokens_seen += n_tokens
            run_tokens += n_tokens
            tok_s = run_tokens / max(time.perf_counter() - t_start, 1e-9)
            if (done % t.logging_steps == 0 or done == sched.total_steps) and (
                    (loss := progress.close_window()) is not None):
                lr = scheduler.get_last_lr()[0]
                logger.log(done, {"train_loss": loss, "learning_rate": lr, "epoch": done / sched.steps_per_epoch,
                                  "tokens_per_s": tok_s, **({} if grad_norm is None else
                                                           {"grad_norm": float(grad_norm)}),
                                  **method.pop_metrics("train", reduce)})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                                mem=format_bytes(peak_memory_bytes()), refresh=False)
            if eval_rows and t.eval_steps and done % t.eval_steps == 0 and done != sched.total_steps:
                record = evaluate(done)
                eval_loss = record["eval_loss"]
                say(f"\n[lorakit] step {done}: eval_loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}"
                    if method.reports_perplexity else
                    f"\n[lorakit] step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
            saved = bool(t.save_steps and done % t.save_steps == 0)
            if saved:
                save_checkpoint(done)
            bar.update(1)
            signum = _stop_signal(accelerator, stop.signum)
            if signum:
                raise TrainingInterrupted(signum, done, ckpt.checkpoint_path(out_dir, done) if saved
                                          else save_checkpoint(done))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if _is_oom(err):
            raise TrainingError(_oom_message(err)) from err
        raise
    finally:
        bar.close()
        stop.restore()
    train_time = time.perf_counter() - t_start

    # 9. final eval, adapter, tokenizer, plot, summary --------------------------------------------------------
    if eval_rows:
        record = evaluate(sched.total_steps)
        eval_loss = record["eval_loss"]
        if method.eval_before:
            say("[lorakit] held-out AFTER training: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    last_train_loss = progress.last_train_loss
    _check_finite(trainable, "the final adapter")
    if sharded is not None:
        sharded.save_adapter(out_dir)  # every process: the adapter's tensors are all-gathered
    if main:
        _save_final(accelerator.unwrap_model(loss_module).model if sharded is None else None, tokenizer, out_dir)
        logger.plot(out_dir)
        summary = {
            "global_step": sched.total_steps, "train_steps_this_run": sched.total_steps - start_step,
            "train_time_s": round(train_time, 2), "tokens_per_s": round(run_tokens / max(train_time, 1e-9), 1),
            "peak_memory_bytes": peak_memory_bytes(), "final_train_loss": last_train_loss,
            "final_eval_loss": eval_loss,
            "final_eval_perplexity": perplexity(eval_loss) if eval_loss and method.reports_perplexity else None,
            "world_size": world, "trainable_params": n_trainable, **method.summary(),
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
    logger.close()
    if gen_examples is not None:
        exact = _exact_match_after(cfg, out_dir, gen_examples, before, accelerator.device, say,
                                   None if sharded is None else (loss_module, tokenizer))
        summary.update(exact if main else {})
    if main:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
        say(f"[lorakit] done: {sched.total_steps - start_step} steps in {train_time:.1f} s, "
            f"{summary['tokens_per_s']:.0f} tokens/s, peak memory {format_bytes(summary['peak_memory_bytes'])}, "
            f"train loss {last_train_loss if last_train_loss is None else round(last_train_loss, 4)}, "
            f"eval loss {eval_loss if eval_loss is None else round(eval_loss, 4)}; adapter in {out_dir}")
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, sched.total_steps, last_train_loss, eval_loss, summary)


def _adapted_model(model: nn.Module, plan: RunPlan, method: TrainingMethod, say: Any, device: torch.device,
                   source: list[Any] | None) -> tuple[nn.Module, nn.Module, Any, int]:
    """Steps 4-5 before the optimizer: the adapter attached (`_attach_adapter`; its parameter counts printed), the
    method's loss module around the model, and [distributed] under FSDP the model sharded -- each decoder layer and
    the rest -- with this process's rows read from `source` (folder and dtype, from `fsdp.empty_base_model`) and
    the adapter's values drawn as one process draws them. Returns ``(model, loss module, ShardedModel or None,
    trainable parameter count)``."""
    rng = torch.random.get_rng_state()  # an init method may draw on the meta model: drawn again below
    model = _attach_adapter(model, plan)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    say(f"[lorakit] trainable params: {n_trainable:,} || all params: {n_all:,} || "
        f"trainable%: {100 * n_trainable / n_all:.4f}")
    if source is None:
        return model, method.loss_module(model), None, n_trainable
    torch.random.set_rng_state(rng)
    values = fsdp.adapter_init_values(model, plan.lora, plan.cfg.model.adapter_name_or_path)
    loss_module = method.loss_module(model)
    sharded = fsdp.ShardedModel(loss_module, model, fsdp.mixed_precision_policy(plan.cfg.training.bf16))
    path, dtype = source
    sharded.load(path, dtype, values, device)
    if plan.new_adapter is not None:
        sharded.after_init(plan.lora)  # e.g. PiSSA's factors, DoRA's magnitude: from the loaded base rows
    return model, loss_module, sharded, n_trainable


def _nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> tuple[str, float] | None:
    """("loss" | "gradient norm", value) when one is NaN / inf (the same on every process: both are reduced)."""
    if not math.isfinite(float(loss)):
        return "loss", float(loss)
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        return "gradient norm", float(grad_norm)
    return None


def _divergence_message(bad: tuple[str, float], step: int, lr: float, start_step: int, t: Any,
                        latest: Path | None) -> str:
    what, value = bad
    if step == start_step + 1 and start_step == 0:
        cause = (" before any update, so the learning rate is not the cause: check the lora settings (lora_alpha, "
                 "r) and the base model's weights and dtype (training.bf16 rather than fp16)")
    else:
        cause = (f"; the learning rate at this step was {lr:.3g}: lower training.learning_rate (now "
                 f"{t.learning_rate:g}), raise training.warmup_steps, keep training.max_grad_norm > 0 (now "
                 f"{t.max_grad_norm:g}), or use training.bf16 rather than fp16")
    kept = (f"the last good checkpoint is {latest} (start a new run from it with model.adapter_name_or_path, "
            "as --resume keeps the old learning rate)" if latest is not None else
            "no checkpoint was written before it (training.save_steps)")
    return f"training diverged at step {step}: the {what} is {value}{cause}. Nothing was saved from this step; {kept}."


def _check_finite(trainable: dict[str, torch.Tensor], what: str) -> None:
    """Never save a non-finite adapter: refuse when a trainable tensor holds NaN / inf."""
    bad = next((n for n, p in trainable.items()  # a sharded (DTensor) tensor: this process's shard
                if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()), None)
    if bad is not None:
        raise TrainingError(f"not saving {what}: the trainable tensor {bad} holds NaN or inf values (the run "
                            "diverged); lower training.learning_rate or check the lora settings")


def _stop_signal(accelerator: Any, signum: int | None) -> int:
    """The SIGINT / SIGTERM received by any process (0: none); every process agrees, so all stop at one step."""
    if accelerator.num_processes == 1:
        return signum or 0
    flag = torch.tensor([signum or 0], device=accelerator.device)
    return int(accelerator.reduce(flag, "max").item())


def _save_final(model: nn.Module | None, tokenizer: Any, out_dir: Path) -> None:
    """The final adapter (None: written already, shard by shard) and tokenizer into `out_dir`; a full disk is one
    `CheckpointError` line."""
    try:
        if model is not None:
            model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    except Exception as err:
        if not ckpt.disk_full(err):
            raise
        latest = ckpt.latest_checkpoint(out_dir)
        raise ckpt.CheckpointError(
            f"no space left on the device while writing the final adapter into {out_dir}: free space, then run "
            "again with --resume" + (f" (it continues from {latest})" if latest else "")) from err
    ckpt.fault_point("final-save")


def _say_notices(plan: RunPlan, say: Any) -> None:
    for line in plan.notices:
        say(f"[lorakit] {line}")
    plan.notices.clear()


def _forward_backward(accelerator: Any, loss_module: nn.Module, method: TrainingMethod,
                      batches: list[tuple[dict[str, torch.Tensor], int]], offload: bool,
                      sharded: fsdp.ShardedModel | None = None) -> tuple[torch.Tensor, float, int]:
    """Forward and backward the micro-batches of one optimizer step; returns (summed loss over all processes,
    N, input tokens). Each process back-propagates ``P * loss_sum / N`` (N: units of the step over all
    micro-batches and processes, counted before the first backward), as DDP (and FSDP's reduce-scatter)
    averages gradients over P."""
    counts = torch.tensor([[method.units(b), n] for b, n in batches]).sum(0)  # (units, tokens)
    n_global, n_tokens = accelerator.reduce(counts.to(accelerator.device), "sum").tolist()
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, (batch, _) in enumerate(batches):
        last = i == len(batches) - 1
        if sharded is not None:
            sync = sharded.no_sync(not last)
        else:
            sync = contextlib.nullcontext() if last else accelerator.no_sync(loss_module)
        with sync, accelerator.autocast(), offload_activations(enabled=offload):
            loss_sum = loss_module(**batch)  # summed over the units of this micro-batch
            accelerator.backward(loss_sum * accelerator.num_processes / max(1, n_global))
        step_loss += loss_sum.detach().double()
    return accelerator.reduce(step_loss, "sum").cpu(), n_global, int(n_tokens)


@torch.no_grad()
def _evaluate(accelerator: Any, loss_module: nn.Module, method: TrainingMethod, rows: list[Row],
              batch_size: int, filler: list[Row] | None = None) -> float:
    """Mean loss per unit over this process's `rows` and all processes. With `filler` (FSDP, where every
    forward is collective) a process with fewer batches than another runs `filler` until they match, uncounted."""
    loss_module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum loss, units)
    starts = list(range(0, len(rows), batch_size))
    n_batches = len(starts)
    if filler is not None:
        n_batches = int(accelerator.gather(torch.tensor([n_batches], device=accelerator.device)).max())
    for i in range(n_batches):
        chunk = rows[starts[i] : starts[i] + batch_size] if i < len(starts) else filler
        batch = {k: v.to(accelerator.device) for k, v in method.collate(chunk).items()}
        with accelerator.autocast():
            loss = loss_module(**batch).double()
        if i < len(starts):
            total[0] += loss
            total[1] += method.units(batch)
    loss_module.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _exact_match_before(cfg: TrainConfig, model: nn.Module, tokenizer: Any, fmt: str | None, measure: bool,
                        say: Any, sharded_root: nn.Module | None = None) -> tuple[list, float | None]:
    """The held-out exact-match prompts [evaluation.path] and, unless resuming, the base model's score (FSDP: every
    process generates its share through `sharded_root`, the loss module around `model`)."""
    ev, t = cfg.evaluation, cfg.training
    examples, skipped = generation_examples(ev.path, cfg.data, tokenizer, ev.max_examples, t.max_seq_length, fmt,
                                            ev.prompt_field, ev.answer_field)
    if skipped:
        say(f"[lorakit] exact match: skipped {skipped} of {skipped + len(examples)} evaluation records "
            f"whose answer is cut off by training.max_seq_length={t.max_seq_length}")
    before = None
    if measure:
        with model.disable_adapter():
            before, _ = exact_match(model if sharded_root is None else sharded_root, tokenizer, examples,
                                    ev.max_new_tokens, ev.batch_size, sharded=sharded_root is not None)
        say(f"[lorakit] exact match BEFORE training: {before:.1%} on {len(examples)} held-out prompts")
    return examples, before


def _exact_match_after(cfg: TrainConfig, out_dir: Path, examples: list, before: float | None,
                       device: torch.device, say: Any,
                       in_memory: tuple[nn.Module, Any] | None = None) -> dict[str, float | None]:
    """Reload base + saved adapter from disk (what a user would do), run the exact-match check, print the score
    and [evaluation.generate_samples] generations; returns the summary entries. Under FSDP (`in_memory`: the
    sharded loss module and the tokenizer) every process generates its share with the trained model in memory,
    as reloading would put the whole model on one process."""
    from lorakit import PeftModel

    m, ev = cfg.model, cfg.evaluation
    if in_memory is not None:
        root, tokenizer = in_memory
        after, pairs = exact_match(root, tokenizer, examples, ev.max_new_tokens, ev.batch_size, sharded=True)
    else:
        base, tokenizer = load_base_model(m.name_or_path, m.torch_dtype, cfg.quantization, m.attn_implementation,
                                          m.revision, m.trust_remote_code, device=device)
        model = PeftModel.from_pretrained(base, str(out_dir))
        after, pairs = exact_match(model, tokenizer, examples, ev.max_new_tokens, ev.batch_size)
    say(f"[lorakit] exact match AFTER training:  {after:.1%} on {len(examples)} held-out prompts"
        + (f" (before: {before:.1%})" if before is not None else ""))
    for gen, exp in pairs[: ev.generate_samples]:
        say(f"    generated {gen.strip()!r:<40} expected {exp.strip()!r}")
    return {"exact_match_before": before, "exact_match_after": after}
