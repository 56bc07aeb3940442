"""Exact-match examples from evaluation files: prompt/answer columns, training-format records, truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.train.data import DataConfig
from lorakit.train.evaluate import check_eval_file, generation_examples

TINY_MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny_model"
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TRAIN = DataConfig(path=str(DATA / "second_word_prompt_completion_train.jsonl"))


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages", "alpaca", "text"])
def test_prompt_answer_columns_follow_the_training_format(tmp_path, tok, fmt):
    path = _jsonl(tmp_path / "e.jsonl", [{"question": "second word: old bear horse\nanswer:", "gold": " bear"}])
    examples, skipped = generation_examples(path, TRAIN, tok, 10, 256, fmt, "question", "gold")
    assert skipped == 0 and len(examples) == 1
    assert examples[0].expected.strip() == "bear"
    prompt = tok.decode(examples[0].prompt_ids)
    assert "second word: old bear horse" in prompt and "bear" not in prompt.rsplit("horse", 1)[1]
    if fmt == "messages":
        assert "<|user|>" in prompt


def test_default_fields_and_training_format_records(tmp_path, tok):
    path = _jsonl(tmp_path / "e.jsonl", [{"prompt": "second word: a cat\nanswer:", "answer": " cat"}])
    examples, _ = generation_examples(path, TRAIN, tok, 10, 64, "prompt_completion")
    assert examples[0].expected == " cat"
    same_format = str(DATA / "second_word_prompt_completion_eval.jsonl")  # prompt / completion records
    examples, _ = generation_examples(same_format, TRAIN, tok, 3, 64, "prompt_completion")
    assert len(examples) == 3


def test_truncated_answers_are_skipped_and_counted(tmp_path, tok):
    rows = [{"prompt": "second word: a cat\nanswer:", "answer": " cat"},
            {"prompt": "word " * 80 + "\nanswer:", "answer": " word"}]
    examples, skipped = generation_examples(_jsonl(tmp_path / "e.jsonl", rows), TRAIN, tok, 10, 32,
                                            "prompt_completion")
    assert (len(examples), skipped) == (1, 1)
    with pytest.raises(ValueError, match="every one of its 1 records .*max_seq_length=32"):
        generation_examples(_jsonl(tmp_path / "f.jsonl", rows[1:]), TRAIN, tok, 10, 32, "prompt_completion")


def test_eval_file_without_prompt_and_answer_is_refused_early(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="evaluation.prompt_field='prompt' and evaluation.answer_field='answer'"):
        check_eval_file(path, TRAIN, "prompt", "answer")
    check_eval_file(path, TRAIN, "question", "answer")
