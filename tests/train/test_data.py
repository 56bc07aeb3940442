"""Data formats, loss masks token by token, loading errors, train/eval splits and the debug view.

The tokenizer is the shipped tiny model's (examples/tiny_model, built by scripts/make_tiny_model.py):
byte-level BPE with a prefix space, EOS ``<|end|>``, chat template ``<|role|>{content}<|end|>``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.train.data import (
    IGNORE_INDEX,
    DataConfig,
    build_datasets,
    detect_format,
    format_debug,
    load_records,
    record_format,
    tokenize_example,
)
from lorakit.train.templates import alpaca_prompt

TINY_MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny_model"
DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_MODEL)


def assert_mask_matches_spans(ex: dict, tok, text: str, spans: list[tuple[int, int]]) -> None:
    """Token by token: a token takes loss iff one of its characters lies in one of the char ``spans``."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex["input_ids"] == enc["input_ids"]
    for tid, label, (start, end) in zip(ex["input_ids"], ex["labels"], enc["offset_mapping"], strict=True):
        in_answer = any(start < b and max(end, start + 1) > a for a, b in spans)
        assert label == (tid if in_answer else IGNORE_INDEX), (tok.decode([tid]), start, label)


def answer_spans(rendered: str, head: str, answers: list[str]) -> list[tuple[int, int]]:
    """Char spans of each ``answer`` found right after ``head``, searching left to right."""
    spans, pos = [], 0
    for a in answers:
        start = rendered.index(head + a, pos) + len(head)
        spans.append((start, start + len(a)))
        pos = start + len(a)
    return spans


def trained_text(ex: dict, tok) -> str:
    """The text of the tokens that take loss, in order."""
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX])


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "repeat: cat dog"},
    {"role": "assistant", "content": "cat dog"},
    {"role": "user", "content": "last word: red fox"},
    {"role": "assistant", "content": "fox"},
]


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [
        (["messages"], "messages"),
        (["prompt", "completion", "id"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output", "text"], "alpaca"),  # alpaca dumps carry a rendered "text" too
        (["text"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_unknown_names_found_and_expected_columns():
    with pytest.raises(ValueError, match=r"\['answer', 'question'\].*prompt_completion: \['prompt', 'completion'\]"):
        detect_format(["question", "answer"])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("format", "sharegpt", "data.format='sharegpt'.*allowed"),
        ("val_set_size", -1, "val_set_size=-1"),
        ("val_set_size", 2.5, "val_set_size=2.5"),
        ("path", "", "data.path"),
        ("max_examples", 0, "max_examples=0"),
    ],
)
def test_data_config_validation(field, value, match):
    kwargs = {"path": "x.jsonl", field: value}
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


# ------------------------------------------------------------------------------------------ masking


def test_messages_loss_on_assistant_turns_only(tok):
    ex = tokenize_example({"messages": CHAT}, tok, "messages", 256)
    # ids are exactly what the chat template gives for the whole conversation
    assert ex["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert not ex["truncated"]
    # token by token: a token is trained iff it lies in an assistant turn (content + "<|end|>")
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    spans = answer_spans(rendered, "<|assistant|>", ["cat dog<|end|>", "fox<|end|>"])
    assert_mask_matches_spans(ex, tok, rendered, spans)
    assert trained_text(ex, tok) == " cat dog<|end|> fox<|end|>"


CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are terse.<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_messages_masking_with_another_template(tok):
    """Newlines after role tags, an injected system prompt: assistant spans still exact, token by token."""
    other = copy.deepcopy(tok)
    other.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    chat = CHAT[1:]  # no system message: the template injects one
    ex = tokenize_example({"messages": chat}, other, "messages", 256)
    rendered = other.apply_chat_template(chat, tokenize=False)
    assert rendered.startswith("<|system|>\nYou are terse.")
    spans = answer_spans(rendered, "<|assistant|>\n", ["cat dog<|end|>\n", "fox<|end|>\n"])
    assert_mask_matches_spans(ex, other, rendered, spans)


def test_messages_train_on_inputs(tok):
    ex = tokenize_example({"messages": CHAT}, tok, "messages", 256, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_messages_without_chat_template_is_an_error(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_example({"messages": CHAT}, bare, "messages", 256)


def test_messages_template_that_rewrites_history_is_an_error(tok):
    odd = copy.deepcopy(tok)  # renders only the last message: prefixes are not prefixes of the whole
    odd.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(ValueError, match="prefixes"):
        tokenize_example({"messages": CHAT}, odd, "messages", 256)


def test_messages_bad_role_is_an_error(tok):
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tokenize_example({"messages": [{"role": "bot", "content": "hi"}]}, tok, "messages", 256)


def test_prompt_completion_loss_on_completion_and_eos(tok):
    record = {"prompt": "repeat: cat dog\nanswer:", "completion": " cat dog"}
    ex = tokenize_example(record, tok, "prompt_completion", 64)
    prompt_len = len(tok("repeat: cat dog\nanswer:", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert trained_text(ex, tok) == " cat dog<|end|>"


@pytest.mark.parametrize("inp", ["red fox", ""])
def test_alpaca_template_and_loss_on_response(tok, inp):
    record = {"instruction": "Say the words in reverse order.", "input": inp, "output": "fox red"}
    ex = tokenize_example(record, tok, "alpaca", 256)
    prompt = alpaca_prompt(record["instruction"], inp)
    assert prompt.endswith("### Response:\n")
    assert ("### Input:\nred fox\n\n" in prompt) == bool(inp)
    assert tok.decode(ex["input_ids"]) == " " + prompt + "fox red<|end|>"  # the tokenizer adds a prefix space
    text = prompt + "fox red"
    without_eos = {"input_ids": ex["input_ids"][:-1], "labels": ex["labels"][:-1]}
    assert_mask_matches_spans(without_eos, tok, text, [(len(prompt), len(text))])
    assert ex["labels"][-1] == ex["input_ids"][-1] == tok.eos_token_id


def test_text_loss_on_everything(tok):
    ex = tokenize_example({"text": "The cat sees a dog."}, tok, "text", 64)
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"]) == " The cat sees a dog.<|end|>"


def test_truncation_keeps_the_start_and_is_flagged(tok):
    full = tokenize_example({"text": "The cat sees a dog. " * 5}, tok, "text", 1000)
    cut = tokenize_example({"text": "The cat sees a dog. " * 5}, tok, "text", 7)
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:7] and cut["labels"] == full["labels"][:7]


# -------------------------------------------------------------------------------------- loading


ROWS = [{"prompt": f"repeat: cat {w}\nanswer:", "completion": f" cat {w}"} for w in ("dog", "fox", "owl", "elk")]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_load_records_file_types(tmp_path, ext):
    import pandas as pd

    path = tmp_path / f"d.{ext}"
    df = pd.DataFrame(ROWS)
    {"jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "json": lambda: df.to_json(path, orient="records"),
     "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[ext]()  # fmt: skip
    ds = load_records(DataConfig(path=str(path)))
    assert record_format(ds) == "prompt_completion"
    assert ds.to_list() == ROWS


def test_load_records_column_overrides_and_drops_extras(tmp_path):
    rows = [{"q": "a?", "a": " b", "id": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_records(DataConfig(path=path, format="prompt_completion", prompt_field="q", completion_field="a"))
    assert ds.to_list() == [{"prompt": "a?", "completion": " b"}]


def test_forced_format_with_missing_columns_names_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match=r"format='alpaca'.*\['instruction', 'output'\] are missing.*\['text'\]"):
        load_records(DataConfig(path=path, format="alpaca"))


def test_missing_file_empty_file_and_bad_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(DataConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_records(DataConfig(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"'\.txt'.*allowed"):
        load_records(DataConfig(path=str(tmp_path / "d.txt")))


# --------------------------------------------------------------------------------- build_datasets


def test_build_datasets_stats_and_val_split(tok, tmp_path):
    rows = [{"text": "The cat sees a dog." * (1 + i % 3)} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, evals, stats = build_datasets(DataConfig(path=path, val_set_size=0.2), tok, 12)
    assert (len(train), len(evals)) == (8, 2)
    assert stats["format"] == "text"
    assert stats["train_examples"] + stats["eval_examples"] == 10
    assert stats["train_tokens"] == sum(len(e["input_ids"]) for e in train)
    assert stats["train_truncated"] + stats["eval_truncated"] == sum(1 for i in range(10) if i % 3)
    assert all(len(e["input_ids"]) <= 12 for e in train + evals)
    _, evals, _ = build_datasets(DataConfig(path=path, val_set_size=3), tok, 12)
    assert len(evals) == 3


def test_build_datasets_validation_path_shipped_data(tok):
    cfg = DataConfig(
        path=str(DATA / "second_word_messages_train.jsonl"),
        validation_path=str(DATA / "second_word_messages_eval.jsonl"),
        max_examples=16,
    )
    train, evals, stats = build_datasets(cfg, tok, 64)
    assert len(train) == 16 and len(evals) == stats["eval_examples"] > 0
    assert stats["train_truncated"] == 0 and stats["train_dropped_no_labels"] == 0


def test_every_label_masked_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "repeat: cat dog owl elk", "completion": " cat"}] * 3)
    with pytest.raises(ValueError, match="every label of the train data is masked"):
        build_datasets(DataConfig(path=path), tok, 4)  # the prompt alone fills max_seq_length


def test_format_debug_marks_masked_tokens(tok):
    ex = tokenize_example({"prompt": "repeat: cat", "completion": " cat"}, tok, "prompt_completion", 64)
    out = format_debug(ex["input_ids"], ex["labels"], tok).splitlines()
    n_masked = sum(lab == IGNORE_INDEX for lab in ex["labels"])
    assert sum("(masked)" in line for line in out) == n_masked > 0
    assert "' cat'" in out[-3] and f"label={ex['input_ids'][-2]}" in out[-3]
    assert out[-1].startswith(f"{len(ex['input_ids'])} tokens, 2 with loss")


@pytest.mark.parametrize("prompt, completion", [("answer: ", "bear"), ("answer:", " bear")])
def test_token_straddling_prompt_and_completion_is_trained(tok, prompt, completion):
    """`Ġbear` starts at the prompt's trailing space: it holds completion characters, so it takes loss."""
    ex = tokenize_example({"prompt": prompt, "completion": completion}, tok, "prompt_completion", 64)
    assert trained_text(ex, tok) == " bear<|end|>"
    assert ex["labels"][-2] == ex["input_ids"][-2] == tok.convert_tokens_to_ids("Ġbear")


def test_renamed_column_onto_an_existing_one_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "prompt": "system"}])
    with pytest.raises(ValueError, match="data.prompt_field='question' renames .* also has a column 'prompt'"):
        load_records(DataConfig(path=path, prompt_field="question", completion_field="answer"))


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}],
     "train data record 1: column 'completion' must be a string, but is missing or null"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
     "train data record 1: column 'completion' must be a string, but is missing or null"),
    ([{"prompt": "a", "completion": 3}], "record 0: column 'completion' must be a string, but is of type int"),
    ([{"instruction": "a", "output": None}], "record 0: column 'output' must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}],
     "record 0: column 'messages': the content of a 'assistant' message must be a string, but is null"),
])
def test_null_or_wrong_type_fields_name_record_and_column(tmp_path, tok, rows, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        build_datasets(DataConfig(path=path), tok, 64)


def test_wrong_type_names_the_renamed_column(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": 1}])
    with pytest.raises(ValueError, match=r"column 'completion' .* \(the column of data.completion_field='a'\)"):
        build_datasets(DataConfig(path=path, prompt_field="q", completion_field="a"), tok, 64)
