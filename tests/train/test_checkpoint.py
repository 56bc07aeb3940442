"""Atomic checkpoint folders: half-written ones are invisible, rotation keeps the newest."""

from __future__ import annotations

import random

import torch

from lorakit.train import checkpoint as ckpt


def _write(root, step):
    tmp = ckpt.begin(root, step)
    (tmp / "x.txt").write_text(str(step))
    return ckpt.commit(tmp, {"global_step": step})


def test_commit_latest_rotate(tmp_path):
    for step in (2, 4, 10):
        _write(tmp_path, step)
    ckpt.begin(tmp_path, 12)  # a run killed while writing step 12
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path)) == {"global_step": 10}
    ckpt.rotate(tmp_path, 2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
    ckpt.clean_temporaries(tmp_path)
    assert not ckpt.temp_dir(tmp_path, 12).exists()


def test_folder_without_state_is_incomplete(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_recommit_same_step_replaces(tmp_path):
    _write(tmp_path, 4)
    tmp = ckpt.begin(tmp_path, 4)
    (tmp / "y.txt").write_text("new")
    final = ckpt.commit(tmp, {"global_step": 4})
    assert (final / "y.txt").exists() and not (final / "x.txt").exists()


def test_rng_round_trip(tmp_path):
    ckpt.save_rng(tmp_path, 0)
    a = (torch.rand(3), random.random())
    ckpt.load_rng(tmp_path, 0)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
