"""Preference data: masks on completions only (strings and chats), KTO rows and their KL rows, clear errors."""

import json

import pytest
from transformers import AutoTokenizer

from lorakit.train.data import IGNORE_INDEX, DataConfig
from lorakit.train.preference_data import (
    build_preference_datasets,
    collate_preference,
    format_pair_debug,
    tokenize_record,
)
from tests.conftest import REPO

CFG = DataConfig(path="unused")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")


def _trained(row, tok):
    return tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX])


def test_string_pair_trains_only_the_completions(tok):
    row = tokenize_record({"prompt": "second word: cat dog\nanswer:", "chosen": " dog", "rejected": " cat"}, "dpo",
                          tok, 64, CFG)
    assert _trained(row["chosen"], tok) == " dog<|end|>" and _trained(row["rejected"], tok) == " cat<|end|>"
    n = len(row["chosen"]["input_ids"]) - 2
    assert row["chosen"]["input_ids"][:n] == row["rejected"]["input_ids"][:n]  # the same prompt tokens


def test_chat_pair_masks_the_whole_prompt_even_its_assistant_turns(tok):
    prompt = [{"role": "user", "content": "first word: cat dog"}, {"role": "assistant", "content": "cat"},
              {"role": "user", "content": "last word: cat dog"}]
    row = tokenize_record({"prompt": prompt, "chosen": [{"role": "assistant", "content": "dog"}],
                           "rejected": [{"role": "assistant", "content": "cat"}]}, "dpo", tok, 64, CFG)
    assert _trained(row["chosen"], tok) == " dog<|end|>" and _trained(row["rejected"], tok) == " cat<|end|>"
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "dog"}], tokenize=False)
    assert row["chosen"]["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # the SFT rendering


def test_collate_stacks_chosen_then_rejected(tok):
    rows = [tokenize_record({"prompt": "a:", "chosen": f" {w}", "rejected": " cat dog"}, "dpo", tok, 64, CFG)
            for w in ("dog", "owl")]
    batch = collate_preference(rows, "dpo", tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, : len(rows[0]["chosen"]["input_ids"])].tolist() == rows[0]["chosen"]["input_ids"]
    assert batch["input_ids"][2, : len(rows[0]["rejected"]["input_ids"])].tolist() == rows[0]["rejected"]["input_ids"]
    debug = format_pair_debug(rows[0], tok)
    assert "--- chosen ---" in debug and "--- rejected ---" in debug and "label=-100 (masked)" in debug


def _write(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_kto_rows_get_the_previous_completion_as_kl_row(tmp_path, tok):
    recs = [{"prompt": f"p{i}:", "completion": f" {w}", "label": i % 2 == 0}
            for i, w in enumerate(["cat", "dog", "owl"])]
    rows, _, stats = build_preference_datasets(DataConfig(path=_write(tmp_path, recs)), "kto", tok, 64)
    assert stats["train_desirable"] == 2 and [r["desirable"] for r in rows] == [True, False, True]
    assert _trained(rows[1]["kl"], tok) == " cat<|end|>" and _trained(rows[0]["kl"], tok) == " owl<|end|>"
    assert tok.decode(rows[1]["kl"]["input_ids"]).strip() == "p1: cat<|end|>"  # prefix space of the tokenizer
    batch = collate_preference(rows, "kto", tok.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True] and batch["kl_input_ids"].shape[0] == 3


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "p", "chosen": " a"}, "'rejected'] is missing"),
    ({"prompt": "p", "chosen": " a", "rejected": None}, "record 1: column 'rejected' is missing or null"),
    ({"prompt": "p", "chosen": "", "rejected": " a"}, "record 1: 'chosen' is empty"),
    ({"prompt": "p", "chosen": " a", "rejected": " a"}, "record 1: 'chosen' and 'rejected' are the same"),
    ({"prompt": "p " * 80, "chosen": " a", "rejected": " b"}, "record 1: the prompt has"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": " a", "rejected": " b"}, "both be strings or both"),
])
def test_bad_records_are_named_with_the_fix(tmp_path, tok, record, message):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    if "rejected" not in record:  # a column missing from the whole file
        path = _write(tmp_path, [record, record])
    else:
        path = _write(tmp_path, [good, record])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_preference_datasets(DataConfig(path=path), "dpo", tok, 32)


def test_kto_label_must_be_a_boolean(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "p", "completion": " a", "label": True},
                             {"prompt": "p", "completion": " b", "label": "yes"}])
    with pytest.raises(ValueError, match="record 1: column 'label' must be true .desirable. or false"):
        build_preference_datasets(DataConfig(path=path), "kto", tok, 32)


def test_pairs_given_to_kto_name_the_method_to_use(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "p", "chosen": " a", "rejected": " b"}])
    with pytest.raises(ValueError, match=r"method kto needs the columns .*prompt/chosen/rejected \(dpo, ...\) data"):
        build_preference_datasets(DataConfig(path=path), "kto", tok, 32)
