"""`lorakit export`: argument parsing, the final line with the file size, and one-line errors."""

import pytest

from lorakit.cli.main import main

pytest.importorskip("gguf")


def test_export_gguf_prints_the_size(tiny_dir, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    rc = main(["export", "--format", "gguf", "--base", str(tiny_dir), "--adapter", str(tiny_adapter), "--out",
               str(out), "--outtype", "q8_0", "--no-progress"])
    assert rc == 0 and out.is_file()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[lorakit] wrote ") and last.endswith(" KB)") and str(out) in last


def test_export_gguf_lora_and_ollama(tiny_dir, tiny_adapter, tmp_path):
    assert main(["export", "--format", "gguf-lora", "--adapter", str(tiny_adapter), "--base", str(tiny_dir),
                 "--out", str(tmp_path / "l.gguf"), "--no-progress"]) == 0
    assert main(["export", "--format", "ollama", "--base", str(tiny_dir), "--out", str(tmp_path / "ol"),
                 "--no-progress"]) == 0
    assert (tmp_path / "ol" / "Modelfile").is_file() and (tmp_path / "ol" / "model.gguf").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--format", "gguf-lora", "--out", "x.gguf"], "needs --adapter"),
    (["--format", "gguf", "--out", "x.gguf"], "needs --base"),
    (["--format", "gguf", "--base", "no/such/folder", "--out", "x.gguf"], "not a model folder"),
])
def test_errors_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit export: error:") and message in err and "\n" not in err
