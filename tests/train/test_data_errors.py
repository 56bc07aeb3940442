"""Data files with a broken record: the error names the line and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.train.data import DataConfig, load_records

GOOD = {"prompt": "second word: a b c\nanswer:", "completion": " b"}


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(("bad", "expected"), [
    ('{"prompt": "x", "completion": "y"', "line 3 is not valid JSON"),
    ('["prompt", "completion"]', "line 3 is not a JSON object but list"),
])
def test_a_broken_jsonl_line_is_named(tmp_path, bad, expected):
    """datasets only said 'DatasetGenerationError: An error occurred while generating the dataset'."""
    path = _write(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(ValueError, match=f"could not read .*d.jsonl': {expected}"):
        load_records(DataConfig(path=path))


def test_a_broken_json_array_is_located(tmp_path):
    path = _write(tmp_path / "d.json", ["[", json.dumps(GOOD) + ",", json.dumps(GOOD)[:-1], "]"])
    with pytest.raises(ValueError, match="it is not valid JSON .* at line 4"):
        load_records(DataConfig(path=path))
    good = _write(tmp_path / "e.json", [json.dumps([GOOD, GOOD])])
    assert len(load_records(DataConfig(path=good))) == 2


@pytest.mark.parametrize("key", ["data.path", "data.validation_path", "evaluation.path"])
def test_a_missing_or_empty_file_names_its_option(tmp_path, key):
    """All three said only 'data file not found: ...', leaving the user to guess which option was wrong."""
    from lorakit.train.data import build_datasets
    from lorakit.train.evaluate import check_eval_file

    good = _write(tmp_path / "good.jsonl", [json.dumps(GOOD)] * 4)
    (tmp_path / "empty.jsonl").write_text("")
    for bad, problem in ((str(tmp_path / "missing.jsonl"), "data file not found"),
                         (str(tmp_path / "empty.jsonl"), "is empty")):
        with pytest.raises((ValueError, FileNotFoundError), match=f"^{key}[:=].*{problem}"):
            if key == "evaluation.path":
                check_eval_file(bad, DataConfig(path=good), "prompt", "answer")
            else:
                cfg = {"path": good, "validation_path": bad} if key == "data.validation_path" else {"path": bad}
                build_datasets(DataConfig(**cfg), None, 64)


def test_options_a_local_file_would_ignore_are_refused(tmp_path):
    """data.split / data.validation_split on a local file, and val_set_size beside validation_path, used to be
    dropped silently."""
    from lorakit.train.data import build_datasets

    good = _write(tmp_path / "good.jsonl", [json.dumps(GOOD)] * 4)
    with pytest.raises(ValueError, match="data.split='test' does not apply to data.path="):
        build_datasets(DataConfig(path=good, split="test"), None, 64)
    with pytest.raises(ValueError, match="data.validation_split='validation' does not apply to data.validation_pa"):
        build_datasets(DataConfig(path=good, validation_path=good, validation_split="validation"), None, 64)
    with pytest.raises(ValueError, match="data.validation_path and data.val_set_size=0.1 are both set"):
        DataConfig(path=good, validation_path=good, val_set_size=0.1)


def test_dataset_folder_errors_name_the_option(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^data.path=.*empty': could not load it as a dataset folder"):
        load_records(DataConfig(path=str(tmp_path / "empty")))
    (tmp_path / "ds").mkdir()
    _write(tmp_path / "ds" / "train.jsonl", [json.dumps(GOOD)] * 2)
    with pytest.raises(ValueError, match="dataset folder \\(data.split='test'\\).*Unknown split"):
        load_records(DataConfig(path=str(tmp_path / "ds"), split="test"))
    assert len(load_records(DataConfig(path=str(tmp_path / "ds")))) == 2
