"""Command-line behaviour a new user meets: Ctrl-C, options that only apply to some methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli.main import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny_model"


def _interrupt_after(checkpoint: Path | None):
    """A stand-in for `train` that writes `checkpoint` (if given) and is then interrupted (Ctrl-C)."""

    def fake_train(cfg, resume=None):
        if checkpoint is not None:
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        raise KeyboardInterrupt

    return fake_train


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_ctrl_c_in_train_prints_how_to_resume(tmp_path, capsys, monkeypatch, with_checkpoint):
    import lorakit.train.loop

    out = tmp_path / "out"
    monkeypatch.setattr(lorakit.train.loop, "train", _interrupt_after(out / "checkpoint-2" if with_checkpoint
                                                                      else None))
    monkeypatch.delenv("LORAKIT_TRACEBACK", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: m\ndata: {{path: d.jsonl}}\ntraining: {{output_dir: {out}, save_steps: 2}}\n")
    assert main(["train", str(cfg), "training.seed=3"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("lorakit train: interrupted")
    if with_checkpoint:
        assert str(out / "checkpoint-2") in err and f"lorakit train {cfg} training.seed=3 --resume" in err
    else:
        assert "nothing to resume" in err


def test_ctrl_c_elsewhere_is_one_line(capsys, monkeypatch):
    import lorakit.cli.inspect

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakit.cli.inspect, "inspect_model", interrupted)
    monkeypatch.delenv("LORAKIT_TRACEBACK", raising=False)
    assert main(["inspect", str(TINY)]) == 130
    assert capsys.readouterr().err == "lorakit inspect: interrupted\n"
