"""`lorakit train` as a new user runs it: reruns over an earlier run, what the data line reports, resume."""

from __future__ import annotations

import json

import pytest

from lorakit.train.config import load_config
from lorakit.train.loop import train


def _run(config_writer, tmp_path, model_dir, name="run", overrides=(), **sections):
    out = tmp_path / name
    path = config_writer(tmp_path / f"{name}.yaml", model_dir, out, **sections)
    return train(load_config(path, list(overrides))), out


def test_overwrite_removes_the_earlier_final_adapter(config_writer, tmp_path, tiny_model_dir):
    """A rerun with overwrite_output_dir that stops early (here: a data error; Ctrl-C alike) must not leave the
    earlier run's adapter and summary beside its own files, where they would load as this run's result."""
    _, out = _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 1})
    assert (out / "adapter_config.json").is_file() and (out / "summary.json").is_file()
    with pytest.raises(ValueError, match="every label of the train data is masked"):
        _run(config_writer, tmp_path, tiny_model_dir,
             training={"max_steps": 1, "overwrite_output_dir": True, "max_seq_length": 2})
    for name in ("adapter_config.json", "adapter_model.safetensors", "summary.json", "loss.png"):
        assert not (out / name).exists(), name


def test_overwrite_refuses_to_delete_the_adapter_it_starts_from(config_writer, tmp_path, tiny_model_dir):
    _, out = _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 1})
    model = {"name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out)}
    with pytest.raises(ValueError, match="model.adapter_name_or_path=.* deletes before training"):
        _run(config_writer, tmp_path, tiny_model_dir, model=model,
             training={"max_steps": 1, "overwrite_output_dir": True})
    assert (out / "adapter_config.json").is_file()


def test_data_line_reports_records_dropped_by_max_seq_length(config_writer, tmp_path, tiny_model_dir, capsys):
    """max_seq_length=18 cuts the answer off 18 of the 32 training records (and 52 of the 100 eval records);
    the run used to report only '14 train examples, 26 truncated'."""
    _run(config_writer, tmp_path, tiny_model_dir, training={"max_steps": 1, "max_seq_length": 18})
    out = capsys.readouterr().out
    assert "14 train examples" in out
    assert "dropped 18 of 32 train records and 52 of 100 eval records with no answer token left" in out


def test_resume_of_a_finished_run_changes_nothing(config_writer, tmp_path, tiny_model_dir, capsys):
    """--resume on a finished run used to rewrite summary.json as a 0-step run (0 s, 0 tokens/s)."""
    training = {"max_steps": 2, "save_steps": 2, "resume": True}
    _, out = _run(config_writer, tmp_path, tiny_model_dir, training=training)
    summary = (out / "summary.json").read_text()
    adapter = (out / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    result, _ = _run(config_writer, tmp_path, tiny_model_dir, training=training)
    printed = capsys.readouterr().out
    assert "finished at step 2" in printed and "nothing to do" in printed
    assert (out / "summary.json").read_text() == summary
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == adapter
    assert result.global_step == 2 and result.train_loss == json.loads(summary)["final_train_loss"]


@pytest.mark.parametrize(("section", "change", "named"), [
    ("training", {"max_seq_length": 128}, "max_seq_length=64, this run has 128"),
    ("data", {"train_on_inputs": True}, "train_on_inputs=False, this run has True"),
    ("quantization", {"method": "nf4"}, "quantization='none', this run has 'nf4'"),
])
def test_resume_refuses_other_examples_or_base_weights(config_writer, tmp_path, tiny_model_dir, section, change,
                                                       named):
    """These changed the examples behind each step (or the base the adapter trains against) and resumed silently."""
    training = {"max_steps": 2, "save_steps": 1, "max_seq_length": 64}
    _run(config_writer, tmp_path, tiny_model_dir, training=training)
    (tmp_path / "run" / "summary.json").unlink()  # as if killed after its last checkpoint
    sections = {"training": {**training, "resume": True}}
    sections[section] = {**sections.get(section, {}), **change}
    with pytest.raises(ValueError, match=f"cannot resume from .*checkpoint-2: it was written with {named}"):
        _run(config_writer, tmp_path, tiny_model_dir, **sections)


def test_output_dir_that_is_the_model_folder_is_refused(config_writer, tmp_path, tiny_model_dir):
    """Training into the model's own folder wrote adapter_config.json beside config.json; transformers then
    loaded that 'model' with the adapter attached, and the next run stacked a second adapter on it."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    path = config_writer(tmp_path / "c.yaml", model, model, training={"max_steps": 1})
    with pytest.raises(ValueError, match="is the model folder \\(model.name_or_path\\)"):
        train(load_config(path))
    assert not (model / "adapter_config.json").exists()
    (model / "adapter_config.json").write_text("{}")  # a folder polluted before this check
    path = config_writer(tmp_path / "d.yaml", model, tmp_path / "out", training={"max_steps": 1})
    with pytest.raises(ValueError, match="holds a model and an adapter \\(adapter_config.json\\)"):
        train(load_config(path))


def test_format_bytes_goes_past_gib():
    """`lorakit estimate` for a large batch printed '195503234.86 GiB'."""
    from lorakit.train.metrics import format_bytes

    assert [format_bytes(n) for n in (10, 2048, 3 * 2**30, 3 * 2**40, 186.5 * 2**50)] == [
        "10 B", "2.00 KiB", "3.00 GiB", "3.00 TiB", "186.50 PiB"]


def test_an_output_dir_that_cannot_be_created_fails_before_loading(config_writer, tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    """It failed after the model and data had loaded, with a bare '[Errno 20] Not a directory' (FileNotFoundError
    for /proc paths) that did not name training.output_dir."""
    import lorakit.train.loop

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lorakit.train.loop, "load_base_model", never)
    (tmp_path / "afile").write_text("x")
    path = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "afile" / "out")
    with pytest.raises(ValueError, match="training.output_dir=.*afile/out' cannot be created: Not a directory"):
        train(load_config(path))


def test_too_few_rows_for_a_batch_says_what_to_lower(config_writer, tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="8 training rows are fewer than one global batch .*lower "
                                         "training.per_device_train_batch_size to at most 8"):
        _run(config_writer, tmp_path, tiny_model_dir, data={"max_examples": 8},
             training={"per_device_train_batch_size": 16})
