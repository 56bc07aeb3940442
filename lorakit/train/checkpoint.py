"""Training checkpoints written atomically: a temporary folder, filled, then renamed into place.

A checkpoint folder ``output_dir/checkpoint-<step>`` holds::

    adapter_config.json, adapter_model.safetensors   # the adapter, PEFT format (loads in PEFT)
    trainable.safetensors                             # every trainable tensor, exactly as in memory
    optimizer.pt, scheduler.pt                        # torch state dicts
    rng_state_<rank>.pt                               # python / numpy / torch (/ cuda) RNG of each process
    trainer_state.json                                # step, epoch, data position, metrics so far

Under ``training.distributed=fsdp`` ``trainable.safetensors`` and ``optimizer.pt`` are replaced by ``sharded/``,
each process's shards written by ``torch.distributed.checkpoint`` (``lorakit.train.distributed``).

Rename is atomic on POSIX file systems, so a folder named ``checkpoint-<step>`` is always complete; a run
killed while writing leaves only a ``.tmp-checkpoint-<step>`` folder, which is ignored and cleaned up by the next
run (`clean_temporaries`). Rotation renames a checkpoint to a ``.tmp-`` name before deleting it, so a run killed
mid-deletion never leaves a half-deleted folder that lists as complete. A full disk while writing, or a damaged
file on resume, raise `CheckpointError`: one line naming the file, the problem and the fix.

Crash tests kill a run at a named point with ``LORAKIT_FAULT=<point>`` or ``<point>@<step>`` (`fault_point`).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
FAULT_ENV = "LORAKIT_FAULT"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (disk full) or read back (damaged); the message names the file and
    the fix."""


def fault_point(name: str, step: int | None = None) -> None:
    """Crash-test hook: SIGKILL this process here when ``LORAKIT_FAULT`` is `name` or ``name@step``."""
    want = os.environ.get(FAULT_ENV)
    if want and want in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def disk_full(err: BaseException) -> bool:
    """Whether `err` is a full disk or quota as Python, safetensors or torch.save report it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "StorageFull" in text or "Disk quota exceeded" in text or (
        "file write failed" in text)  # torch.save (PytorchStreamWriter) on ENOSPC


def damaged(path: Path, name: str, problem: str) -> CheckpointError:
    """The error for file `name` of checkpoint `path`, naming the previous complete checkpoint to resume from."""
    earlier = [d for d in checkpoint_dirs(path.parent) if d != path and _step(d) < _step(path)]
    fix = (f"Resume from the previous checkpoint {earlier[-1]}: move {path} out of {path.parent} and run again "
           "with --resume" if earlier else
           f"There is no earlier checkpoint: move {path} away and start again (training.overwrite_output_dir=true)")
    return CheckpointError(f"checkpoint {path} is damaged: {name} {problem}. {fix}.")


def _step(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (by step number)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the complete checkpoint of `step` lives."""
    return Path(output_dir) / f"{PREFIX}{step}"


def temp_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The temporary folder a checkpoint of `step` is written into (same name on every process)."""
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """Create an empty temporary folder for the checkpoint of `step` (main process only)."""
    tmp = temp_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any]) -> Path:
    """Write trainer_state.json last, then rename `tmp` to ``checkpoint-<step>`` (main process only)."""
    step = int(state["global_step"])
    _write_json(tmp / STATE_FILE, state)
    final = tmp.parent / f"{PREFIX}{step}"
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        old = tmp.parent / f"{TMP_PREFIX}old-{step}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    return final


def rotate(output_dir: str | os.PathLike, save_total_limit: int | None) -> list[Path]:
    """Delete all but the newest `save_total_limit` checkpoints; returns what was deleted."""
    if save_total_limit is None:
        return []
    dirs = checkpoint_dirs(output_dir)
    doomed = dirs[: max(0, len(dirs) - save_total_limit)]
    for path in doomed:
        gone = path.parent / f"{TMP_PREFIX}deleting-{path.name}"
        if gone.exists():
            shutil.rmtree(gone)
        os.replace(path, gone)  # first no longer listed as complete, then deleted
        fault_point("checkpoint-rotate")
        shutil.rmtree(gone)
    return doomed


def clean_temporaries(output_dir: str | os.PathLike) -> None:
    """Remove what a killed run left: half-written or half-deleted checkpoints (``.tmp-checkpoint-*``), the
    library's temporary folders of a checkpoint's adapter (``.tmp-.tmp-checkpoint-*``) and of the final adapter
    (``.tmp-<output_dir name>-<8 characters>`` beside output_dir)."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    own = re.compile(rf"^\.tmp-{re.escape(root.resolve().name)}-[a-z0-9_]{{8}}$")
    stale = [c for c in root.iterdir() if c.name.startswith((TMP_PREFIX, f".tmp-{TMP_PREFIX}"))]
    stale += [c for c in root.resolve().parent.iterdir() if own.match(c.name)]
    for child in stale:
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def save(output_dir: Path, step: int, model: nn.Module, trainable: dict[str, torch.Tensor], optimizer: Any,
         scheduler: Any, state: dict[str, Any], rank: int, main: bool, barrier: Any,
         save_total_limit: int | None = None, sharded: Any | None = None) -> None:
    """Write ``checkpoint-<step>`` of a run (every process calls it; `barrier` synchronizes them).

    Each process writes its RNG state; the main process the PEFT adapter of `model`, every `trainable` tensor
    as in memory, the optimizer and scheduler states and `state` (trainer_state.json, last), then renames the
    folder into place and deletes the checkpoints past `save_total_limit`. With `sharded` (a
    `lorakit.train.distributed.ShardedModel`) every process takes part in writing the adapter and its shards.
    """
    from safetensors.torch import save_file

    tmp = temp_dir(output_dir, step)
    if main:
        begin(output_dir, step)
    barrier()
    writing = f"rng_state_{rank}.pt"
    try:
        save_rng(tmp, rank)
        if sharded is not None:
            writing = "the adapter and sharded/"
            sharded.save_adapter(tmp)
            sharded.save_state(tmp, optimizer)
        if main:
            if sharded is None:
                writing = "adapter_model.safetensors"
                model.save_pretrained(tmp)
                writing = TRAINABLE_FILE
                save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, tmp / TRAINABLE_FILE)
                writing = "optimizer.pt"
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            writing = "scheduler.pt"
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            fault_point("checkpoint-write", step)
            writing = STATE_FILE
            commit(tmp, {"global_step": step, **state})
            rotate(output_dir, save_total_limit)
    except Exception as err:
        if not disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"no space left on the device while writing {writing} of checkpoint-{step} into {output_dir}: free "
            "space (or lower training.save_total_limit), then continue with --resume from "
            + (f"{latest}" if latest else "the start (no checkpoint was complete)")) from err
    barrier()


def restore(path: Path, trainable: dict[str, torch.Tensor], optimizer: Any, scheduler: Any, rank: int,
            sharded: Any | None = None) -> None:
    """Load checkpoint `path` into the `trainable` tensors, the optimizer, the scheduler and this process's RNGs;
    refuses a checkpoint whose trainable tensors differ in names or shapes. With `sharded` its ``sharded/``
    folder is read instead (every process calls it)."""
    from safetensors.torch import load_file

    if sharded is not None:
        sharded.load_state(path, optimizer)
        scheduler.load_state_dict(_load(path, "scheduler.pt"))
        load_rng(path, rank)
        return
    try:
        saved = load_file(path / TRAINABLE_FILE)
    except Exception as err:  # SafetensorError on a truncated file, OSError when missing
        raise damaged(path, TRAINABLE_FILE, f"cannot be read ({err})") from err
    if set(saved) != set(trainable):
        raise ValueError(f"{path} does not match this config's adapter: trainable tensors "
                         f"differ (e.g. {sorted(set(saved) ^ set(trainable))[:3]})")
    shapes = [n for n in saved if saved[n].shape != trainable[n].shape]
    if shapes:
        raise ValueError(f"{path} does not match this config's adapter: {shapes[0]} has shape "
                         f"{tuple(saved[shapes[0]].shape)} there, {tuple(trainable[shapes[0]].shape)} here")
    with torch.no_grad():
        for name, value in saved.items():
            trainable[name].copy_(value)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        target.load_state_dict(_load(path, name))
    load_rng(path, rank)


def _load(path: Path, name: str) -> Any:
    """``torch.load`` of file `name` of checkpoint `path` (never runs pickled code); `CheckpointError` if damaged."""
    try:
        return torch.load(path / name, weights_only=True)
    except Exception as err:  # RuntimeError / UnpicklingError / EOFError on a truncated file, OSError when missing
        raise damaged(path, name, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of checkpoint `path`; `CheckpointError` when unreadable or without a step number."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise damaged(path, STATE_FILE, f"cannot be read ({err})") from err
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise damaged(path, STATE_FILE, f"has global_step={step!r}, not a step number")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout uses torch's)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # as a tensor and plain numbers, so the file loads with torch.load(weights_only=True)
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: Path, rank: int) -> None:
    torch.save(rng_state(), directory / f"rng_state_{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng_state_{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: was the checkpoint written with a different number of "
                                "processes? Resume with the same world size.")
    set_rng_state(_load(directory, path.name))  # checkpoint files never run pickled code


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
