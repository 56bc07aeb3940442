"""Library saves under faults: kills at every file call, permissions from the umask, stale temporaries cleaned,
non-finite weights refused (issue 17, items 1, 4, 5, 8)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.io.files import atomic_directory, atomic_write_text

from ..conftest import REPO, make_tiny_llama

DRIVER = Path(__file__).with_name("kill_saves.py")


def _model(**kwargs):
    return get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                        **kwargs))


def test_save_killed_at_every_file_call_leaves_the_old_folder_or_the_new_one(tmp_path) -> None:
    """Saving over a folder with two adapters (root + other/), a user's notes and a run folder: SIGKILL before each
    file call of the save in turn (an audit hook in a forked child). Every kill leaves exactly the old tree or
    exactly the new one; the next save gives the new tree and leaves no .tmp-* folder beside it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "adapter")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["mixed"] == [], f"kills that left a mix of old and new files: {result}"
    assert result["after_next_save"] == [], f"the next save did not give the new folder cleanly: {result}"
    assert result["points"] >= 20 and result["old"] > 0 and result["new"] > 0, result


def test_stale_temporaries_of_dead_saves_are_cleaned_live_ones_kept(tmp_path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        stale = tmp_path / f".tmp-adapter-{dead}-abcd_123"
        live = tmp_path / f".tmp-adapter-{sleeper.pid}-efgh_456"
        other = tmp_path / f".tmp-adapter-v2-{dead}-abcd_123"  # another target's
        for folder in (stale, live, other):
            (folder / "sub").mkdir(parents=True)
        _model().save_pretrained(tmp_path / "adapter")
        assert not stale.exists() and live.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def _modes(folder: Path) -> dict[str, int]:
    modes = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        modes[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_get_the_umask_permissions(tmp_path, umask) -> None:
    """mkdtemp (0700), mkstemp and safetensors (0600) made saved adapters unreadable to a serving user or a team."""
    model = _model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "new")  # a new folder
        (tmp_path / "again").mkdir()
        model.save_pretrained(tmp_path / "again")  # over an existing one
        atomic_write_text(tmp_path / "note.json", "{}")
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", tmp_path / "again"):
        modes = _modes(folder)
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "other",
                "other/adapter_model.safetensors"} <= set(modes)
        for name, mode in modes.items():
            expected = (0o777 if (folder / name).is_dir() else 0o666) & ~umask
            assert mode == expected, f"{folder.name}/{name}: {oct(mode)}, expected {oct(expected)}"
    assert stat.S_IMODE((tmp_path / "note.json").stat().st_mode) == 0o666 & ~umask


def test_a_resave_keeps_the_folder_mode_and_files_it_does_not_write(tmp_path) -> None:
    folder = tmp_path / "adapter"
    _model().save_pretrained(folder)
    folder.chmod(0o750)
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"x" * 10)
    (folder / "notes.txt").write_text("mine")
    _model().save_pretrained(folder, safe_serialization=False)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "checkpoint-1" / "optimizer.pt").is_file()
    assert not (folder / "adapter_model.safetensors").exists() and (folder / "adapter_model.bin").is_file()


def test_saving_into_the_current_directory_follows_it(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "adapter"
    _model().save_pretrained(folder)
    monkeypatch.chdir(folder)
    _model().save_pretrained(".")
    assert os.getcwd() == str(folder.resolve()) and os.path.isfile("adapter_config.json")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []


def test_a_failing_body_leaves_the_target_untouched(tmp_path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        Path(tmp, "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["target"]


def test_save_refuses_non_finite_weights_unless_asked(tmp_path, input_ids) -> None:
    """A diverged run (NaN lora_B) saved an all-NaN adapter that then generated "" without an error."""
    model = _model()
    model.save_pretrained(tmp_path / "good")
    before = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"adapter 'default' has non-finite weights.*lora_B.*allow_non_finite=True"):
        model.save_pretrained(tmp_path / "good")
    assert (tmp_path / "good" / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    model.save_pretrained(tmp_path / "bad", allow_non_finite=True)
    assert (tmp_path / "bad" / "adapter_model.safetensors").is_file()
