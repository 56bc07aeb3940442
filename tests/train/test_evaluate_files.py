"""evaluation.path files that do not fit the run: another format, prompt/answer columns that are not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.train.data import DataConfig
from lorakit.train.evaluate import check_eval_file, generation_examples

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
TRAIN = DataConfig(path=str(DATA / "second_word_messages_train.jsonl"))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")


@pytest.mark.parametrize("other", ["alpaca", "prompt_completion"])
def test_eval_records_in_another_format_are_refused(tok, other):
    """Training on chats, an alpaca or prompt/completion eval file was scored on prompts the model never saw."""
    path = str(DATA / f"second_word_{other}_eval.jsonl")
    with pytest.raises(ValueError, match=f"holds '{other}' records, the training data 'messages' ones"):
        generation_examples(path, TRAIN, tok, 4, 256, "messages")
    same = str(DATA / "second_word_messages_eval.jsonl")
    assert len(generation_examples(same, TRAIN, tok, 4, 256, "messages")[0]) == 4


def test_prompt_completion_records_still_evaluate_text_training(tok):
    path = str(DATA / "second_word_prompt_completion_eval.jsonl")
    assert len(generation_examples(path, TRAIN, tok, 2, 256, "text")[0]) == 2


def test_a_prompt_field_that_is_not_a_column_is_an_error(tmp_path):
    """evaluation.prompt_field=question on a file without that column fell back to its chats silently."""
    path = str(DATA / "second_word_messages_eval.jsonl")
    with pytest.raises(ValueError, match="evaluation.prompt_field='question' is not a column .*\\['messages'\\]"):
        check_eval_file(path, TRAIN, "question", "answer")
    rows = tmp_path / "e.jsonl"
    rows.write_text(json.dumps({"question": "q", "gold": "a"}) + "\n")
    with pytest.raises(ValueError, match="evaluation.answer_field='answer_text' is not a column"):
        check_eval_file(str(rows), TRAIN, "question", "answer_text")
    check_eval_file(path, TRAIN, "prompt", "answer")  # the defaults: training-format records are fine
