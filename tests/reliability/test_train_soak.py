"""Crash-resume soak: a 200-step `lorakit train` run killed with SIGKILL at N random moments and at each fault
point, `--resume`d after each kill; the final adapter is bitwise equal to the uninterrupted run's."""

from __future__ import annotations

import random
import signal
import time

import pytest

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import load_config
from lorakit.train.loop import train
from tests.reliability.train_helpers import config_maker, same_adapter, strict_json, train_process

RANDOM_KILLS = 8
"""Kills at random moments (N in docs/reliability.md); one more at each of the three fault points."""


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, config_writer):
    return config_maker(tmp_path, tiny_model_dir, config_writer)


@pytest.mark.slow
def test_crash_resume_soak(run_config):
    training = {"max_steps": 200, "save_steps": 10, "save_total_limit": 3, "logging_steps": 5}
    full_cfg, full = run_config("full", **training)
    t0 = time.time()
    train(load_config(full_cfg))
    step_s = (time.time() - t0) / 200  # an upper bound: includes loading and the final eval
    cfg, out = run_config("soak", **training)
    rng = random.Random(0)
    faults = ["checkpoint-write@60", "checkpoint-rotate"]  # first; final-save on every later run until it fires
    random_kills = fault_kills = 0
    final_fired = False
    for _ in range(60):
        if faults:
            env = {ckpt.FAULT_ENV: faults.pop(0)}
        else:
            env = {} if final_fired else {ckpt.FAULT_ENV: "final-save"}
        proc = train_process(cfg, "--resume", env=env)
        sent = False
        if ckpt.FAULT_ENV not in env or env[ckpt.FAULT_ENV] == "final-save":
            if random_kills < RANDOM_KILLS:  # start-up (~3-6 s) plus up to ~20 steps: kills in loading and steps
                deadline = time.time() + rng.uniform(1.0, 6.0) + rng.uniform(0, 20) * step_s
                while proc.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    sent = True
        _, err = proc.communicate(timeout=600)
        if proc.returncode == -signal.SIGKILL:
            random_kills += sent
            fault_kills += not sent
            final_fired |= not sent and env.get(ckpt.FAULT_ENV) == "final-save"
            continue
        assert proc.returncode == 0, err
        if final_fired and random_kills >= RANDOM_KILLS:
            break
    print(f"soak: {random_kills} random kills, {fault_kills} fault-point kills")
    assert random_kills == RANDOM_KILLS and fault_kills == 3
    assert same_adapter(full, out)
    records = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [strict_json(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train_loss")) for r in records] == [(r["step"], r.get("train_loss")) for r in expected]
