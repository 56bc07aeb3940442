"""`lorakit train` under faults (issue 17, the training side): divergence, a second run into the same folder, edited
data on resume, SIGINT / SIGTERM, a full disk, damaged checkpoints, what killed runs leave behind. Each test proves
a promise of docs/reliability.md ("Training runs")."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import load_config
from lorakit.train.lock import LOCK_FILE, OutputDirLocked
from lorakit.train.loop import TrainingError, train
from lorakit.train.plan import prepare_run
from lorakit.train.signals import StopOnSignal, TrainingInterrupted
from tests.reliability.train_helpers import config_maker, same_adapter, strict_json, train_process, wait_for_step

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, config_writer):
    return config_maker(tmp_path, tiny_model_dir, config_writer)


def _nan_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make the training loss of the `calls`-th micro-batches (1-based) NaN: a fault only this run sees."""
    import lorakit.train.sft

    real = lorakit.train.sft.CausalLMLoss.forward
    seen = [0]

    def forward(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        if self.training:
            seen[0] += 1
            if seen[0] in calls:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(lorakit.train.sft.CausalLMLoss, "forward", forward)


def _records(out: Path) -> list[dict]:
    return [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_divergence_stops_at_the_first_nonfinite_loss(run_config, monkeypatch, capsys):
    """Exit 2 naming the step, the learning rate and what to lower; the last good checkpoint is kept and named;
    no adapter is saved from the bad step; metrics.jsonl stays strict JSON."""
    _nan_loss_at(monkeypatch, {3})
    cfg, out = run_config(max_steps=5, save_steps=2)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lorakit train: error: training diverged at step 3: the loss is nan; the learning rate "
                          "at this step was") and "lower training.learning_rate (now 0.01)" in err
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in err
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()
    assert _records(out)[-1] == {"step": 3, "train_loss": None, "nonfinite": "loss"}
    assert not (out / LOCK_FILE).exists()


def test_a_nonfinite_first_step_blames_the_settings_not_the_learning_rate(run_config, monkeypatch):
    _nan_loss_at(monkeypatch, {1})
    cfg, out = run_config(max_steps=2)
    with pytest.raises(TrainingError, match="diverged at step 1: the loss is nan before any update, so the learning "
                                            "rate is not the cause: check the lora settings"):
        train(load_config(cfg))


def test_nonfinite_steps_within_the_patience_are_skipped(run_config, monkeypatch):
    """nonfinite_patience=1: the NaN step makes no update, the run finishes, summary.json is strict JSON."""
    _nan_loss_at(monkeypatch, {2})
    cfg, out = run_config(max_steps=3, nonfinite_patience=1)
    result = train(load_config(cfg))
    assert result.global_step == 3 and result.train_loss is not None
    assert {"step": 2, "train_loss": None, "nonfinite": "loss"} in _records(out)
    strict_json((out / "summary.json").read_text())
    weights = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_second_run_into_a_locked_output_dir_is_refused(run_config):
    """Another live process holds the lock: refused naming its PID and host; once it is gone (kill -9), its stale
    lock is taken over with a notice; the lock file goes when the run ends."""
    cfg, out = run_config()
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lorakit.train.lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirLocked, match=f"is in use by another lorakit run \\(process {holder.pid} on "
                                                  f"{re.escape(socket.gethostname())}"):
            prepare_run(load_config(cfg), lock=True)
    finally:
        holder.kill()
        holder.wait()
    plan = prepare_run(load_config(cfg), lock=True)
    assert plan.notices == [f"took over the lock {out / LOCK_FILE} left by process {holder.pid} on "
                            f"{socket.gethostname()}, which is no longer running"]
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    plan.release()
    assert not (out / LOCK_FILE).exists()


def test_resume_refuses_edited_data(run_config, tmp_path):
    """Same rows, same format, one completion edited: the tokenized data's fingerprint differs."""
    data = tmp_path / "train.jsonl"
    shutil.copy(DATA / "second_word_prompt_completion_train.jsonl", data)
    cfg, out = run_config(data={"path": str(data)}, max_steps=2, save_steps=1)
    train(load_config(cfg))
    (out / "summary.json").unlink()  # as if killed after its last checkpoint
    lines = data.read_text().splitlines()
    record = json.loads(lines[0])
    record["completion"] = record["completion"] + " x"
    data.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-2: the training data changed since it was "
                                         "written"):
        train(load_config(cfg, ["training.resume=true"]))
    assert "train_data_sha256" in ckpt.read_state(out / "checkpoint-2")


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"),
                                                     (signal.SIGINT, 130, "interrupted")])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits(run_config, monkeypatch, capsys, signum, code,
                                                                  name):
    """os.kill during step 2 (from inside its forward): step 2 completes, checkpoint-2 is written, the exit status
    is 128 + signal and the message gives the --resume command; no final adapter, the lock is released."""
    import lorakit.train.sft

    real, seen = lorakit.train.sft.CausalLMLoss.forward, [0]

    def forward(self, *args, **kwargs):
        seen[0] += self.training
        if self.training and seen[0] == 2:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lorakit.train.sft.CausalLMLoss, "forward", forward)
    cfg, out = run_config(max_steps=50)
    assert main(["train", str(cfg), "training.seed=7"]) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"lorakit train: {name}; checkpoint written at step 2: {out / 'checkpoint-2'}; continue with "
                   f"`lorakit train {cfg} training.seed=7 --resume`")
    assert ckpt.read_state(out / "checkpoint-2")["global_step"] == 2
    assert not (out / LOCK_FILE).exists() and not (out / "adapter_model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigterm_to_a_train_process_exits_143_with_a_checkpoint(run_config):
    cfg, out = run_config(max_steps=1000)
    proc = train_process(cfg, "training.seed=7")
    wait_for_step(out, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    found = re.search(r"lorakit train: SIGTERM; checkpoint written at step (\d+): (\S+); continue with `(.*)`", err)
    assert found, err
    step = int(found.group(1))
    assert Path(found.group(2)) == out / f"checkpoint-{step}" and ckpt.read_state(out / f"checkpoint-{step}")[
        "global_step"] == step
    assert found.group(3) == f"lorakit train {cfg} training.seed=7 --resume"
    assert not (out / LOCK_FILE).exists() and not (out / "adapter_model.safetensors").exists()


def test_sigterm_while_loading_the_model_exits_143_after_loading(run_config, monkeypatch, capsys):
    """A signal before the first step: no step ran, so nothing new to save; the message says there is nothing to
    resume (no checkpoint yet) and the exit status is 143."""
    import lorakit.train.loop

    real = lorakit.train.loop.load_base_model

    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(lorakit.train.loop, "load_base_model", load)
    cfg, out = run_config(max_steps=3, save_steps=1)
    assert main(["train", str(cfg)]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lorakit train: SIGTERM; no checkpoint was written yet") and "nothing to resume" in err
    assert not ckpt.checkpoint_dirs(out) and not (out / LOCK_FILE).exists()


def test_a_second_signal_stops_at_once():
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first: noted, the loop finishes its step
        with pytest.raises(TrainingInterrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
    assert err.value.signum == signal.SIGTERM and err.value.checkpoint is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_disk_full_while_writing_a_checkpoint_is_one_line(run_config, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if str(filename).endswith(ckpt.TRAINABLE_FILE):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    cfg, out = run_config(max_steps=2, save_steps=1)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"lorakit train: error: no space left on the device while writing trainable.safetensors of "
                       f"checkpoint-1 into {out}: free space (or lower training.save_total_limit), then continue "
                       "with --resume from the start (no checkpoint was complete)")
    assert not any(line.startswith("Traceback") for line in err)
    assert not list(out.glob(".tmp-*")) and not (out / LOCK_FILE).exists()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_model_dir):
    """A 2-step run with checkpoint-1 and checkpoint-2 (and its config), trained once for the damage tests."""
    from tests.conftest import write_config

    root = tmp_path_factory.mktemp("two")
    cfg = write_config(root / "c.yaml", tiny_model_dir, root / "run", training={"max_steps": 2, "save_steps": 1})
    train(load_config(cfg))
    (root / "run" / "summary.json").unlink()  # as if killed after its last checkpoint
    return root


@pytest.mark.parametrize(("damage", "named"), [
    (lambda c: (c / ckpt.TRAINABLE_FILE).write_bytes((c / ckpt.TRAINABLE_FILE).read_bytes()[:100]),
     "trainable.safetensors cannot be read"),
    (lambda c: (c / ckpt.STATE_FILE).write_text((c / ckpt.STATE_FILE).read_text()[:30]),
     "trainer_state.json cannot be read"),
    (lambda c: (c / ckpt.STATE_FILE).write_text(json.dumps({"global_step": "two"})),
     "trainer_state.json has global_step='two', not a step number"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"\xff" * 10), "optimizer.pt cannot be read"),
], ids=["truncated-trainable", "truncated-state", "text-step", "garbage-optimizer"])
def test_a_damaged_checkpoint_names_the_file_and_the_previous_checkpoint(two_checkpoints, tmp_path, capsys, damage,
                                                                          named):
    root = tmp_path / "copy"
    shutil.copytree(two_checkpoints, root)
    cfg = root / "c.yaml"
    cfg.write_text(cfg.read_text().replace(str(two_checkpoints), str(root)))
    damage(root / "run" / "checkpoint-2")
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lorakit train: error: checkpoint {root / 'run/checkpoint-2'} is damaged: {named}")
    assert err[-1].endswith(f"Resume from the previous checkpoint {root / 'run/checkpoint-1'}: move "
                            f"{root / 'run/checkpoint-2'} out of {root / 'run'} and run again with --resume.")


def _leftovers(out: Path) -> tuple[list[Path], Path]:
    """Folders killed library saves leave (ours: cleaned by the next run) and one of another target (kept)."""
    ours = [out.parent / f".tmp-{out.name}-abcd1234", out / ".tmp-.tmp-checkpoint-6-abcd1234"]
    other = out.parent / f".tmp-{out.name}-2-abcd1234"  # a library save into "<name>-2": not this run's
    for path in [*ours, other]:
        path.mkdir()
    return ours, other


def _same_run(full: Path, out: Path) -> None:
    assert same_adapter(full, out)
    losses = [{r["step"]: r["train_loss"] for r in _records(d) if "train_loss" in r} for d in (full, out)]
    assert losses[0] == losses[1]


def test_a_run_cut_short_while_writing_a_checkpoint_resumes_bitwise_and_cleans_up(run_config, monkeypatch):
    """The run stops (here: an exception at the fault point) while checkpoint-4 is half written; the --resume run
    deletes what was left and ends bitwise equal to an uninterrupted run."""
    training = {"max_steps": 6, "save_steps": 2}
    full_cfg, full = run_config("full", **training)
    train(load_config(full_cfg))
    cfg, out = run_config("cut", **training)

    def cut(name, step=None):
        if (name, step) == ("checkpoint-write", 4):
            raise SystemExit("cut short")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "fault_point", cut)
        with pytest.raises(SystemExit):
            train(load_config(cfg))
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["checkpoint-2"] and (out / ".tmp-checkpoint-4").is_dir()
    ours, other = _leftovers(out)
    train(load_config(cfg, ["training.resume=true"]))
    _same_run(full, out)
    assert not any(p.exists() for p in ours) and not (out / ".tmp-checkpoint-4").exists() and other.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint-write@4", "checkpoint-rotate", "final-save"])
def test_kill_9_at_a_fault_point_then_resume_is_bitwise_equal(run_config, capsys, point):
    """kill -9 of a `lorakit train` process at a fault point; --resume takes over its stale lock, deletes what it
    left and ends bitwise equal to an uninterrupted run."""
    training = {"max_steps": 6, "save_steps": 2, "save_total_limit": 2}
    full_cfg, full = run_config("full", **training)
    train(load_config(full_cfg))
    cfg, out = run_config("killed", **training)
    proc = train_process(cfg, env={ckpt.FAULT_ENV: point})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (out / LOCK_FILE).is_file()
    ours, other = _leftovers(out)
    capsys.readouterr()
    train(load_config(cfg, ["training.resume=true"]))
    assert f"took over the lock {out / LOCK_FILE} left by process {proc.pid}" in capsys.readouterr().out
    _same_run(full, out)
    assert not any(p.exists() for p in ours) and not list(out.glob(".tmp-*")) and other.is_dir()


def test_a_rotation_cut_short_never_lists_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        ckpt.commit(ckpt.begin(tmp_path, step), {"global_step": step})

    def killed(name, step=None):
        raise SystemExit(f"killed at {name}")

    monkeypatch.setattr(ckpt, "fault_point", killed)
    with pytest.raises(SystemExit):
        ckpt.rotate(tmp_path, 1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-2"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-2"
    ckpt.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
