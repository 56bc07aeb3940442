"""The plan of a `lorakit train` run: every refusal, decided before any model weight is read.

``prepare_run(cfg, resume)`` reads the config, the output folder and (for ``--resume``) the newest checkpoint's
``trainer_state.json`` and adapter config, and refuses, with one message naming the key and the fix:

- fp16 without CUDA (`mixed_precision`); an output_dir that is a file, the model's own folder, or cannot be created;
- a new run over an earlier one without ``overwrite_output_dir`` (or an overwrite that would delete one of
  this run's inputs); ``--resume`` over a finished adapter that has no checkpoint;
- a ``lora`` section that differs from the adapter of ``model.adapter_name_or_path``, or from the checkpoint;
- a checkpoint written with another number of processes, or damaged; a missing or unreadable evaluation file;
- with ``lock=True``, an output_dir another live run holds (`lorakit.train.lock`);
- what ``training.distributed=fsdp`` does not implement (`_check_fsdp`).

Once the training rows are known (after tokenization), ``RunPlan.schedule(n_rows, fingerprint=...)`` resolves
the step counts and refuses a checkpoint whose data order, optimizer, schedule or data content differ
(``Schedule.data_order``, `data_fingerprint`); once the model is built, ``RunPlan.check_targets(model)`` compares
the modules ``target_modules`` selects.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import check_eval_file
from lorakit.train.lock import OutputDirLocked, RunLock
from lorakit.train.metrics import PLOT_FILE, SUMMARY_FILE

LORA_KEYS_CHECKED = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_dora",
                     "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias", "bias",
                     "layers_to_transform", "layers_pattern", "fan_in_fan_out")
"""LoraConfig fields a resumed run must share with its checkpoint (they change the adapter or its maths)."""


@dataclass(frozen=True)
class LoraCheck:
    """A LoRA config this run must agree with on ``keys``: ``mine`` (this run's) against ``saved``."""

    mine: Any
    saved: Any
    keys: tuple[str, ...]
    refusal: str
    """The message's start and end: ``{diffs}`` is replaced by the differences."""
    target_refusal: str
    """The same for target_modules (checked once the model exists): ``{diff}`` is the first difference."""


def lora_differences(mine: Any, saved: Any, keys: Any, model: nn.Module | None = None) -> list[str]:
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


def data_fingerprint(rows: list[dict[str, Any]]) -> str:
    """sha256 of the tokenized training rows, in order (every key, sorted; int lists as int64 in native byte
    order): any edit of the data that changes a token, a label or the order changes it."""
    h = hashlib.sha256()
    for row in rows:
        for key in sorted(row):
            value = row[key]
            h.update(key.encode())
            try:
                packed = array.array("q", value).tobytes() if isinstance(value, list) else None
            except (TypeError, OverflowError):  # not a list of ints
                packed = None
            h.update(len(packed).to_bytes(8, "little") + packed if packed is not None else repr(value).encode())
    return h.hexdigest()


def check_resume_state(state: dict[str, Any], where: Path, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written by a run with another world size, step count, data order or data (a named
    setting first; the content fingerprint catches the edits no setting names)."""
    for key, value in expected.items():
        if key in state and state[key] != value and key != "train_data_sha256":
            raise ValueError(
                f"cannot resume from {where}: it was written with {key}={state[key]!r}, this run has {value!r} "
                "(it would see other batches / another schedule, or the optimizer and schedule restored from the "
                "checkpoint would override it). Resume with the same config and number of processes, or start a "
                f"new run from its adapter (model.adapter_name_or_path={str(where)!r}, another "
                "training.output_dir).")
    if "train_data_sha256" in state and state["train_data_sha256"] != expected.get("train_data_sha256",
                                                                                  state["train_data_sha256"]):
        raise ValueError(
            f"cannot resume from {where}: the training data changed since it was written (the tokenized rows have "
            "another content fingerprint, train_data_sha256), so the resumed steps would train on other examples. "
            "Restore the data of that run, or start a new run from its adapter "
            f"(model.adapter_name_or_path={str(where)!r}, another training.output_dir).")
    if "total_steps" in expected and state["global_step"] > expected["total_steps"]:
        raise ValueError(f"cannot resume from {where}: it is at step {state['global_step']}, past this run's "
                         f"{expected['total_steps']} steps")


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run, a pure function of the config, the row count and the number of processes.

    One optimizer step = ``accum`` micro-batches of ``batch_size`` rows on each of ``world`` processes.
    """

    batch_size: int
    accum: int
    world: int
    micro_per_epoch: int
    """Global micro-batches (``batch_size * world`` rows) per epoch; an incomplete last one is dropped."""
    steps_per_epoch: int
    total_steps: int
    warmup: int
    data_order: dict[str, Any]
    """What a checkpoint records and a resumed run must share: the examples behind each step, the optimizer
    and schedule (restored from the checkpoint, so changed values would not apply), the base weights."""


@dataclass
class RunPlan:
    """What `train()` will do, decided before the model loads (see the module docstring)."""

    cfg: TrainConfig
    out_dir: Path
    resume: bool
    world: int
    lora: Any
    """This run's adapter config: the ``lora`` section, or the adapter's own with model.adapter_name_or_path."""
    new_adapter: Any | None
    """The LoraConfig of a fresh adapter (None when starting from model.adapter_name_or_path)."""
    resume_from: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    """trainer_state.json of ``resume_from`` ({} without)."""
    earlier: list[Path] = field(default_factory=list)
    """Outputs of an earlier run that ``overwrite_output_dir`` deletes (``clear_earlier_run``)."""
    lora_checks: list[LoraCheck] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    """Lines to print: switches that do nothing in this run, a stale lock taken over."""
    lock: RunLock | None = None
    """The output_dir's lock, held until `release` (main process, ``prepare_run(lock=True)``)."""
    fsdp: bool = False
    """Shard the model across the processes (training.distributed=fsdp with more than one process)."""

    def release(self) -> None:
        """Drop the output_dir's lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def clear_earlier_run(self) -> None:
        """Delete the earlier run's outputs (overwrite_output_dir; main process only)."""
        for old in self.earlier:
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()

    def schedule(self, n_rows: int, has_eval: bool = True, fingerprint: str | None = None) -> Schedule:
        """Resolve the step counts for `n_rows` training rows (of content `fingerprint`, `data_fingerprint`);
        refuse a checkpoint of another data order or data."""
        t, world = self.cfg.training, self.world
        bs, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
        micro_per_epoch = n_rows // (bs * world)
        if micro_per_epoch == 0:
            raise ValueError(f"{n_rows} training rows are fewer than one global batch "
                             f"(training.per_device_train_batch_size={bs} x {world} processes): lower "
                             f"training.per_device_train_batch_size to at most {n_rows // world} (and raise "
                             "gradient_accumulation_steps to keep the global batch), or give more data")
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
        warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
        m, data = self.cfg.model, self.cfg.data
        data_order = {"total_steps": total_steps, "seed": t.seed, "per_device_train_batch_size": bs,
                      "gradient_accumulation_steps": accum, "train_rows": n_rows,
                      "learning_rate": t.learning_rate, "lr_scheduler_type": t.lr_scheduler_type,
                      "warmup_steps_resolved": warmup, "optim": t.optim, "weight_decay": t.weight_decay,
                      "adam_betas": [t.adam_beta1, t.adam_beta2], "adam_epsilon": t.adam_epsilon,
                      "max_seq_length": t.max_seq_length, "packing": t.packing,
                      "train_on_inputs": data.train_on_inputs, "quantization": self.cfg.quantization.method,
                      "distributed": "fsdp" if self.fsdp else "ddp",
                      "base_model": os.path.abspath(m.name_or_path) if os.path.exists(m.name_or_path)
                      else m.name_or_path}
        data_order["method"] = self.cfg.method  # a checkpoint of another training method (or its settings) is refused
        if self.cfg.method != "sft":
            data_order["preference"] = asdict(self.cfg.preference)
        if fingerprint is not None:
            data_order["train_data_sha256"] = fingerprint
        if self.resume_from is not None:
            check_resume_state(self.state, self.resume_from, data_order)
        if t.eval_steps and not has_eval:
            self.notices.append(f"training.eval_steps={t.eval_steps} is ignored: there is no eval data (set "
                                "data.validation_path or data.val_set_size)")
        return Schedule(bs, accum, world, micro_per_epoch, steps_per_epoch, total_steps, warmup, data_order)

    def finished_summary(self, total_steps: int) -> dict[str, Any] | None:
        """The summary of this run when ``--resume`` finds it finished at `total_steps` (its final adapter and
        summary written), else None: rerunning would rewrite its summary as a 0-step run."""
        if self.resume_from is None or self.state.get("global_step") != total_steps:
            return None
        path = self.out_dir / SUMMARY_FILE
        if not (self.out_dir / "adapter_config.json").is_file() or not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            return None
        return summary if isinstance(summary, dict) and summary.get("global_step") == total_steps else None

    def add_lora_check(self, check: LoraCheck) -> None:
        """Refuse now the differences on every key but target_modules; keep the check for `check_targets`."""
        diffs = lora_differences(check.mine, check.saved, check.keys)
        if diffs:
            raise ValueError(check.refusal.format(diffs="; ".join(diffs)))
        self.lora_checks.append(check)

    def check_targets(self, model: nn.Module) -> None:
        """Refuse target_modules that select other modules of `model` than the adapter / checkpoint adapts."""
        for check in self.lora_checks:
            if "target_modules" in check.keys:
                diffs = lora_differences(check.mine, check.saved, ["target_modules"], model)
                if diffs:
                    raise ValueError(check.target_refusal.format(diff=diffs[0]))


def mixed_precision(t: Any) -> str:
    """accelerate's mixed_precision for training.bf16 / training.fp16; fp16 needs CUDA (loss scaling)."""
    if t.fp16 and not torch.cuda.is_available():
        raise ValueError("training.fp16=true needs a CUDA GPU; on CPU use training.bf16=true")
    return "bf16" if t.bf16 else "fp16" if t.fp16 else "no"


def prepare_run(cfg: TrainConfig, resume: bool | None = None, world_size: int = 1, main: bool = True,
                lock: bool = False) -> RunPlan:
    """Check everything about a run that needs no model; returns its `RunPlan` (see the module docstring).

    Creates output_dir (on the main process), so an unwritable one fails now, not after the model loaded. With
    `lock`, takes the output_dir's `RunLock` right after (another run in it is refused); `RunPlan.release`
    drops it, and so does a refusal raised here.
    """
    t, m = cfg.training, cfg.model
    resume = t.resume if resume is None else resume
    out_dir = Path(t.output_dir)
    mixed_precision(t)
    if os.path.isdir(m.name_or_path) and Path(m.name_or_path).resolve() == out_dir.resolve():
        raise ValueError(f"training.output_dir={str(out_dir)!r} is the model folder (model.name_or_path): the adapter, "
                         "tokenizer and logs would be written into it, and transformers would then load that model "
                         "with the adapter attached. Pick another training.output_dir.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"training.output_dir={str(out_dir)!r} is an existing file; give a folder path")
    if main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"training.output_dir={str(out_dir)!r} cannot be created: {err.strerror or err}") from err
    plan = RunPlan(cfg, out_dir, resume, world_size, lora=None, new_adapter=None)
    if lock:
        try:
            plan.lock = RunLock(out_dir).acquire()
        except OutputDirLocked:
            raise
        except OSError as err:  # a folder this user cannot write into
            raise ValueError(f"training.output_dir={str(out_dir)!r} is not writable: {err.strerror or err}") from err
        if plan.lock.notice:
            plan.notices.append(plan.lock.notice)
    try:
        plan.resume_from = _check_output_dir(out_dir, resume, t.overwrite_output_dir)
        plan.lora = plan.new_adapter = cfg.lora_config()
        _check_run(plan)
    except BaseException:
        plan.release()
        raise
    return plan


def _check_run(plan: RunPlan) -> None:
    """The refusals of `prepare_run` that read the adapter, the checkpoint and the inputs."""
    from lorakit.config import LoraConfig

    cfg, user_lora, resume_from, out_dir = plan.cfg, plan.lora, plan.resume_from, plan.out_dir
    t, m, ev = cfg.training, cfg.model, cfg.evaluation
    if m.adapter_name_or_path:  # the adapter brings its own config: the lora section must agree with it
        plan.lora, plan.new_adapter = LoraConfig.from_pretrained(m.adapter_name_or_path), None
        where = f"model.adapter_name_or_path={m.adapter_name_or_path!r}"
        plan.add_lora_check(LoraCheck(
            user_lora, plan.lora, tuple(k for k in cfg.lora if k != "task_type"),
            f"{where} brings its own LoRA config, and the lora section differs from it: {{diffs}}. Remove these "
            "lora keys (or start a fresh adapter without model.adapter_name_or_path).",
            f"{where}: {{diff}}. Remove lora.target_modules (the adapter's own are used)."))
    if resume_from is not None:
        plan.state = ckpt.read_state(resume_from)
        check_resume_state(plan.state, resume_from, {"world_size": plan.world})
        try:
            saved = LoraConfig.from_pretrained(resume_from)
        except (OSError, ValueError, TypeError) as err:
            raise ckpt.damaged(resume_from, "adapter_config.json", f"cannot be read ({err})") from err
        plan.add_lora_check(LoraCheck(
            plan.lora, saved, LORA_KEYS_CHECKED,
            f"cannot resume from {resume_from}: its adapter differs from this config's ({{diffs}}). Resume with "
            "the config of that run, or start a new training.output_dir.",
            f"cannot resume from {resume_from}: {{diff}}. Resume with the config of that run, or start a new "
            "training.output_dir."))

    if t.overwrite_output_dir and not plan.resume:
        plan.earlier = [d.resolve() for d in [*_earlier_outputs(out_dir), *ckpt.checkpoint_dirs(out_dir)]]
        _check_inputs_outside(plan.earlier, {
            "model.name_or_path": m.name_or_path, "model.adapter_name_or_path": m.adapter_name_or_path,
            "data.path": cfg.data.path, "data.validation_path": cfg.data.validation_path, "evaluation.path": ev.path,
        }, out_dir)
    if ev.path:  # a wrong eval file fails now, not after the model has loaded
        check_eval_file(ev.path, cfg.data, ev.prompt_field, ev.answer_field)
    if t.distributed == "fsdp":
        _check_fsdp(cfg, plan)
    if t.offload_activations and not torch.cuda.is_available():
        plan.notices.append("training.offload_activations=true does nothing here: it offloads CUDA activations "
                            "only, and this run is on CPU")


def _check_fsdp(cfg: TrainConfig, plan: RunPlan) -> None:
    """Refuse what sharded training (`lorakit.train.distributed`) does not implement; one process needs no
    sharding (a notice says so)."""
    if plan.world == 1:
        plan.notices.append("training.distributed=fsdp with one process: nothing to shard, it trains as one "
                            "process (launch with torchrun --nproc_per_node N or accelerate launch to shard)")
        return
    from lorakit.quant.gguf_in import find_gguf

    fix = "use training.distributed=ddp for it"
    if find_gguf(cfg.model.name_or_path) is not None:
        raise NotImplementedError(
            f"training.distributed=fsdp with a GGUF model ({cfg.model.name_or_path}) is not implemented (each process "
            "reads its rows from safetensors files). Save it once as a model folder -- model, tokenizer = "
            "lorakit.load_model(path); model.save_pretrained(folder); tokenizer.save_pretrained(folder) -- and give "
            f"that folder, or {fix}")
    if cfg.quantization.method == "int8":
        raise NotImplementedError(f"training.distributed=fsdp with quantization=int8 is not implemented (4-bit "
                                  f"bases shard: quantization=nf4 or fp4); or {fix}")
    lora = plan.lora  # model.adapter_name_or_path: its saved config (its tensors are loaded, not initialized)
    allowed = (True, False, "gaussian", "orthogonal", "pissa", "olora")
    if plan.new_adapter is not None and lora.init_lora_weights not in allowed:
        raise NotImplementedError(
            f"training.distributed=fsdp with lora.init_lora_weights={lora.init_lora_weights!r} is not implemented "
            f"(adapters are built on the meta device, and each decoder layer is gathered once after loading: "
            f"init_lora_weights {', '.join(repr(a) for a in allowed)}); {fix}")
    if cfg.training.bf16:
        plan.notices.append("training.bf16 under FSDP: parameters are all-gathered in bf16 and gradients reduced "
                            "in fp32; the sharded adapters and their AdamW state stay fp32")
    plan.fsdp = True


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
