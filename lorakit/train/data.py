"""Training data: loading, format detection, tokenization with loss masks, packing and batching.

Pipeline (``build_datasets`` runs the first three)::

    load_records(cfg)            datasets.Dataset with canonical columns (messages | prompt, completion |
                                 instruction, input, output | text)
    tokenize_example(...)        {"input_ids", "labels", "truncated"}; labels are -100 where no loss is taken
    pack_examples(...)           optional: greedy packing into max_seq_length rows
    collate(batch, ...)          padded tensors for the model

Loss masking (the default, ``train_on_inputs=False``) follows TRL's SFTTrainer and Axolotl: loss on the
assistant turns (``messages``), the completion (``prompt_completion``), the response (``alpaca``), every
token (``text``). Labels are *unshifted* (``labels[t] == input_ids[t]`` where trained): the model shifts
them, so ``labels[0]`` never counts.

Packing without cross-example attention: each packed row restarts ``position_ids`` at every example and
``collate`` builds a block-diagonal causal mask (B, 1, T, T) of 0 / -inf in the model dtype, because
restarting positions alone does NOT isolate examples with the sdpa or eager attention of transformers
(measured: tests/train/test_data_packing.py::test_restarted_positions_alone_leak_across_examples). The first
label of every packed example is masked so the last token of one example is not trained to predict the first
token of the next.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train.templates import (
    FieldTypeError,
    Segment,
    alpaca_segments,
    chat_segments,
    prompt_completion_segments,
    text_segments,
)

IGNORE_INDEX = -100
"""Label of tokens that take no loss (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``)."""

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "text")
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),  # "input" is optional
    "text": ("text",),
}
"""Columns each format needs, in detection priority order (alpaca dumps often also carry ``text``)."""

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where the training data is and how to turn it into token ids and labels."""

    path: str = ""
    """A local .jsonl / .json / .csv / .parquet file, a local dataset folder, or a Hub dataset name."""
    format: str = "auto"
    """One of FORMATS; "auto" picks from the columns (see ``detect_format``)."""
    split: str = "train"
    """Split to read from a Hub dataset or dataset folder (local files always have one split, "train")."""
    validation_path: str | None = None
    """Optional file or dataset for evaluation, in the same format (exclusive with val_set_size)."""
    validation_split: str = "train"
    """Split to read from validation_path."""
    val_set_size: float = 0
    """Held-out part of the training data for evaluation: 0 (none), a fraction in (0, 1), or a count >= 1."""
    train_on_inputs: bool = False
    """True: loss on every token (prompts and user turns too) instead of the answer parts only."""
    shuffle_seed: int = 42
    """Seed of the train/validation split."""
    max_examples: int | None = None
    """Use only the first N records (after the validation split); None uses all."""
    messages_field: str = "messages"
    """Column holding the chat (a list of {"role", "content"} dicts)."""
    prompt_field: str = "prompt"
    """Column holding the prompt of the prompt_completion format."""
    completion_field: str = "completion"
    """Column holding the completion of the prompt_completion format."""
    text_field: str = "text"
    """Column holding the text of the text format."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path must be a non-empty file path or dataset name, got {self.path!r}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} is not supported; allowed: {list(FORMATS)}")
        v = self.val_set_size
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v >= 1 and v != int(v)):
            raise ValueError(
                f"data.val_set_size={v!r} must be 0, a fraction in (0, 1) or a whole count >= 1"
            )
        if v and self.validation_path is not None:
            raise ValueError(f"data.validation_path and data.val_set_size={v!r} are both set: the eval data comes "
                             "from one of them; remove the other")
        if self.max_examples is not None and (
            isinstance(self.max_examples, bool)
            or not isinstance(self.max_examples, int)
            or self.max_examples < 1
        ):
            raise ValueError(f"data.max_examples={self.max_examples!r} must be None or an integer >= 1")
        for name in ("messages_field", "prompt_field", "completion_field", "text_field", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.{name} must be a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------- loading


def detect_format(columns: list[str] | tuple[str, ...]) -> str:
    """The data format implied by a dataset's column names.

    Checked in order: ``messages``; ``prompt`` + ``completion``; ``instruction`` + ``output`` (alpaca,
    ``input`` optional); ``text``. Raises ValueError naming the columns found and the ones expected.
    """
    cols = set(columns)
    for fmt, needed in FORMAT_COLUMNS.items():
        if set(needed) <= cols:
            return fmt
    expected = "; ".join(f"{fmt}: {list(needed)}" for fmt, needed in FORMAT_COLUMNS.items())
    raise ValueError(
        f"cannot tell the data format from the columns {sorted(cols)}; expected one of: {expected} "
        "(or set data.format and the *_field options to map your column names)"
    )


def _json_problem(path: str) -> str | None:
    """Where a .json / .jsonl file stops being a JSON array or JSON Lines of objects ("line 6 is not valid
    JSON: ..."), or None when it parses."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"it is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        return None
    for n, line in enumerate(text.splitlines(), 1):  # JSON Lines: one object per line
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}"
        if not isinstance(value, dict):
            return f"line {n} is not a JSON object but {type(value).__name__} {line.strip()[:40]!r}"
    return None


def _load_dataset(path: str, split: str, key: str = "data.path") -> Any:
    """The raw ``datasets.Dataset`` of a file, dataset folder or Hub name; errors name the option (`key`)."""
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if ext not in _FILE_BUILDERS:
            raise ValueError(
                f"data file {path!r} has extension {ext!r}; allowed: {sorted(_FILE_BUILDERS)}"
            )
        with open(path, "rb") as f:
            if not f.read(1 << 16).strip() and os.path.getsize(path) <= 1 << 16:
                raise ValueError(f"{key}: dataset {path!r} is empty (no records)")
        try:
            return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train")
        except Exception as e:
            problem = _json_problem(path) if _FILE_BUILDERS[ext] == "json" else None
            if problem:  # datasets only says "An error occurred while generating the dataset"
                raise ValueError(f"could not read {path!r}: {problem}; fix or remove it") from e
            raise ValueError(f"could not read {path!r} as {ext} data: {type(e).__name__}: {e}") from e
    if os.path.isdir(path):
        try:
            return datasets.load_dataset(path, split=split)
        except (ValueError, FileNotFoundError, KeyError) as e:  # no data files, unknown split, ...
            split_key = {"data.path": "data.split", "data.validation_path": "data.validation_split"}.get(key, "split")
            raise ValueError(f"{key}={path!r}: could not load it as a dataset folder ({split_key}={split!r}): "
                             f"{e}") from e
    if ext in _FILE_BUILDERS or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{key}: data file not found: {path!r} (resolved to {os.path.abspath(path)!r})")
    try:  # a Hub dataset name, e.g. "tatsu-lab/alpaca"
        return datasets.load_dataset(path, split=split)
    except Exception as e:
        raise ValueError(
            f"{key}={path!r} is not a local file or folder, and loading it as a Hub dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {e}"
        ) from e


def _canonical(ds: Any, cfg: DataConfig, fmt: str) -> Any:
    """Rename the configured columns to the canonical names of ``fmt`` and drop the rest."""
    renames = {
        "messages": {cfg.messages_field: "messages"},
        "prompt_completion": {cfg.prompt_field: "prompt", cfg.completion_field: "completion"},
        "text": {cfg.text_field: "text"},
        "alpaca": {},
    }[fmt]
    renames = {src: dst for src, dst in renames.items() if src != dst}
    for src, dst in renames.items():
        if dst in ds.column_names and dst not in renames:
            option = {"messages": "messages_field", "prompt": "prompt_field", "completion": "completion_field",
                      "text": "text_field"}[dst]
            raise ValueError(
                f"data.{option}={src!r} renames the column {src!r} to {dst!r}, but the data also has a column "
                f"{dst!r}: it is unclear which one to train on. Remove or rename the {dst!r} column in the "
                f"data, or set data.{option}={dst!r} to use it instead of {src!r}."
            )
    if renames:
        ds = ds.rename_columns(renames)
    keep = set(FORMAT_COLUMNS[fmt]) | ({"input"} if fmt == "alpaca" else set())
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def _resolve_format(cfg: DataConfig, columns: list[str]) -> str:
    fields = {
        cfg.messages_field: "messages",
        cfg.prompt_field: "prompt",
        cfg.completion_field: "completion",
        cfg.text_field: "text",
    }
    canonical = [fields.get(c, c) for c in columns]
    if cfg.format == "auto":
        return detect_format(canonical)
    missing = [c for c in FORMAT_COLUMNS[cfg.format] if c not in canonical]
    if missing:
        raise ValueError(
            f"data.format={cfg.format!r} needs the columns {list(FORMAT_COLUMNS[cfg.format])}, but "
            f"{missing} are missing; found {sorted(columns)}"
        )
    return cfg.format


def load_records(cfg: DataConfig, path: str | None = None, split: str | None = None, key: str = "data.path"
                 ) -> Any:
    """Load ``cfg.path`` (or ``path``) as a ``datasets.Dataset`` with the canonical columns of its format.

    The resolved format is stored in ``dataset.info.description`` as ``"lorakit-format=<fmt>"`` and
    returned by ``record_format``. Errors: FileNotFoundError for a missing local file, ValueError for an
    empty dataset or columns that match no format; both name the option `key` that gave the path.
    """
    path = cfg.path if path is None else path
    ds = _load_dataset(path, cfg.split if split is None else split, key)
    if len(ds) == 0:
        raise ValueError(f"{key}: dataset {path!r} is empty (0 records)")
    fmt = _resolve_format(cfg, ds.column_names)
    ds = _canonical(ds, cfg, fmt)
    ds.info.description = f"lorakit-format={fmt}"
    return ds


def record_format(ds: Any) -> str:
    """The format ``load_records`` resolved for ``ds``."""
    desc = ds.info.description or ""
    if not desc.startswith("lorakit-format="):
        raise ValueError("dataset was not produced by load_records; its format is unknown")
    return desc.removeprefix("lorakit-format=")


# -------------------------------------------------------------------------------------- tokenization


def _segments(example: dict[str, Any], tokenizer: Any, fmt: str) -> list[Segment]:
    if fmt == "messages":
        return chat_segments(example["messages"], tokenizer)
    if fmt == "prompt_completion":
        return prompt_completion_segments(example)
    if fmt == "alpaca":
        return alpaca_segments(example)
    if fmt == "text":
        return text_segments(example)
    raise ValueError(f"format {fmt!r} is not supported here; allowed: {list(FORMAT_COLUMNS)}")


def tokenize_example(
    example: dict[str, Any],
    tokenizer: Any,
    fmt: str,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> dict[str, Any]:
    """Token ids and labels of one canonical record: ``tokenize_segments`` of its format's segments.

    Returns ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``; ``labels[t]`` is
    ``input_ids[t]`` where loss is taken and -100 elsewhere.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "lorakit needs a fast tokenizer (tokenizers-backed) to map tokens to prompt/answer spans; "
            f"got {type(tokenizer).__name__}"
        )
    return tokenize_segments(_segments(example, tokenizer, fmt), tokenizer, fmt == "messages", max_seq_length,
                             train_on_inputs)


def tokenize_segments(
    segments: list[Segment],
    tokenizer: Any,
    chat: bool,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> dict[str, Any]:
    """Token ids and labels of ``(text, trained)`` segments (see ``lorakit.train.templates``).

    The text of all segments is tokenized in one call (so ids equal what the tokenizer gives for the whole
    text, e.g. ``apply_chat_template(..., tokenize=True)`` for chats); a token is trained when any of its
    characters lies in a trained segment (via the fast tokenizer's offset mapping), so a token that
    straddles the prompt/answer boundary (``"Ġbear"`` after a prompt ending in a space) is trained, as TRL
    trains the completion. Special tokens
    the tokenizer adds itself (BOS) are masked. Unless `chat` (a rendered chat template, which adds its own
    special tokens and closes turns itself) the tokenizer's special tokens are added and ``eos_token_id`` is
    appended, trained, unless the text already ends with it.
    Sequences longer than ``max_seq_length`` keep their first ``max_seq_length`` tokens.
    """
    text = "".join(s for s, _ in segments)
    trained_before = [0]  # trained_before[c]: trained characters in text[:c]
    for s, trained in segments:
        flag = int(trained or train_on_inputs)
        trained_before += [trained_before[-1] + flag * (i + 1) for i in range(len(s))]
    enc = tokenizer(
        text, add_special_tokens=not chat, return_offsets_mapping=True, return_attention_mask=False
    )
    special = set(tokenizer.all_special_ids)
    input_ids: list[int] = list(enc["input_ids"])
    labels: list[int] = []
    for tok, (start, end) in zip(input_ids, enc["offset_mapping"], strict=True):
        if start == end and tok in special:  # added by the tokenizer, not from the text (e.g. BOS)
            labels.append(tok if train_on_inputs else IGNORE_INDEX)
            continue
        end = min(max(end, start + 1), len(text))  # an empty span takes the flag of the character at start
        trained = trained_before[end] > trained_before[min(start, end - 1)]
        labels.append(tok if trained else IGNORE_INDEX)
    eos = tokenizer.eos_token_id
    if not chat and eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        labels.append(eos)
    truncated = len(input_ids) > max_seq_length
    return {
        "input_ids": input_ids[:max_seq_length],
        "labels": labels[:max_seq_length],
        "truncated": truncated,
    }


def _source_columns(cfg: DataConfig) -> dict[str, str]:
    """Canonical column -> the ``data.*_field`` option that renamed it, where one did."""
    fields = {"messages": "messages_field", "prompt": "prompt_field", "completion": "completion_field",
              "text": "text_field"}
    return {col: f"data.{opt}={getattr(cfg, opt)!r}" for col, opt in fields.items() if getattr(cfg, opt) != col}


def tokenize_record(record: dict[str, Any], index: int, tokenizer: Any, fmt: str, max_seq_length: int,
                    train_on_inputs: bool, where: str, cfg: DataConfig | None = None) -> dict[str, Any]:
    """``tokenize_example`` with errors naming the record (`where` and its 0-based index) and the column."""
    try:
        return tokenize_example(record, tokenizer, fmt, max_seq_length, train_on_inputs)
    except FieldTypeError as err:
        source = _source_columns(cfg).get(err.column) if cfg is not None else None
        raise ValueError(f"{where} record {index}: {err}" + (f" (the column of {source})" if source else "")
                         + "; fix or remove that record") from err


def _tokenize_split(ds: Any, tokenizer: Any, fmt: str, max_seq_length: int, train_on_inputs: bool, name: str,
                    cfg: DataConfig | None = None):
    examples: list[dict[str, list[int]]] = []
    stats = {f"{name}_records": len(ds), f"{name}_truncated": 0, f"{name}_dropped_no_labels": 0}
    for i, record in enumerate(ds):
        ex = tokenize_record(record, i, tokenizer, fmt, max_seq_length, train_on_inputs, f"{name} data", cfg)
        stats[f"{name}_truncated"] += ex["truncated"]
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):  # labels[0] never counts
            stats[f"{name}_dropped_no_labels"] += 1
            continue
        examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    if not examples:
        raise ValueError(
            f"every label of the {name} data is masked ({len(ds)} records, format {fmt!r}, "
            f"max_seq_length={max_seq_length}): nothing to train on. Check that answers are present "
            "(assistant turns / completion / output), that max_seq_length is not cutting them off, "
            "or set train_on_inputs=True"
        )
    stats[f"{name}_examples"] = len(examples)
    stats[f"{name}_tokens"] = sum(len(e["input_ids"]) for e in examples)
    stats[f"{name}_trainable_tokens"] = sum(
        sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples
    )
    return examples, stats


def build_datasets(
    cfg: DataConfig, tokenizer: Any, max_seq_length: int
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]] | None, dict[str, Any]]:
    """Load, split and tokenize: ``(train_examples, eval_examples or None, stats)``.

    Examples are ``{"input_ids": list[int], "labels": list[int]}``. Records whose every label is masked
    (e.g. an answer truncated away) are dropped and counted. ``stats`` is a flat dict (ready for
    metrics.jsonl): ``format``, and per split (``train_`` / ``eval_`` prefix) ``records``, ``examples``,
    ``tokens``, ``trainable_tokens`` (labels that take loss after the shift), ``truncated``,
    ``dropped_no_labels``.
    """
    for path_key, split_key in (("path", "split"), ("validation_path", "validation_split")):
        path, split = getattr(cfg, path_key), getattr(cfg, split_key)
        if path is not None and os.path.isfile(path) and split != "train":  # it would be ignored
            raise ValueError(f"data.{split_key}={split!r} does not apply to data.{path_key}={path!r}: a local file "
                             f"has one split, 'train'. Remove data.{split_key}, or give a dataset folder or Hub "
                             "dataset with splits")
    ds = load_records(cfg)
    fmt = record_format(ds)
    eval_ds = None
    if cfg.validation_path is not None:
        eval_ds = load_records(cfg, path=cfg.validation_path, split=cfg.validation_split, key="data.validation_path")
        if record_format(eval_ds) != fmt:
            raise ValueError(
                f"data.validation_path {cfg.validation_path!r} has format {record_format(eval_ds)!r} "
                f"but the training data has {fmt!r}; they must match"
            )
    elif cfg.val_set_size:
        size = cfg.val_set_size if cfg.val_set_size < 1 else int(cfg.val_set_size)
        n_eval = math.ceil(size * len(ds)) if size < 1 else size
        if n_eval >= len(ds):
            raise ValueError(
                f"data.val_set_size={cfg.val_set_size} leaves no training records ({len(ds)} records)"
            )
        parts = ds.train_test_split(test_size=size, seed=cfg.shuffle_seed)
        ds, eval_ds = parts["train"], parts["test"]
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    train, stats = _tokenize_split(ds, tokenizer, fmt, max_seq_length, cfg.train_on_inputs, "train", cfg)
    stats = {"format": fmt, **stats}
    evals = None
    if eval_ds is not None:
        evals, eval_stats = _tokenize_split(
            eval_ds, tokenizer, fmt, max_seq_length, cfg.train_on_inputs, "eval", cfg
        )
        stats.update(eval_stats)
    return train, evals, stats


# ---------------------------------------------------------------------------------- packing, batching


def pack_examples(examples: list[dict[str, list[int]]], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Greedily pack examples, in order, into rows of at most ``max_seq_length`` tokens.

    A row is closed when the next example does not fit. Each row holds ``input_ids``, ``labels`` (the first
    label of every example set to -100, so no token is trained to predict across a boundary),
    ``position_ids`` (0, 1, ... restarting at each example) and ``seq_lens`` (lengths of its examples, in
    order; they sum to the row length).
    """
    packs: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_seq_length:
            raise ValueError(f"an example has {n} tokens > max_seq_length={max_seq_length}; tokenize first")
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_seq_length:
            packs.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
        cur["position_ids"] += list(range(n))
        cur["seq_lens"].append(n)
    if cur["input_ids"]:
        packs.append(cur)
    return packs


def block_causal_mask(seq_lens: list[list[int]], total_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, T, T): 0 where query i may attend key j, the dtype's min elsewhere.

    Row b is block-diagonal over ``seq_lens[b]`` and causal within each block:
    ``allowed[i, j] = (j <= i) and seg(i) == seg(j)``. Padding positions (after the last block) attend only
    to themselves, so no softmax row is empty (an all -inf row gives NaN).
    """
    mask = torch.full((len(seq_lens), 1, total_len, total_len), torch.finfo(dtype).min, dtype=dtype)
    causal = torch.ones(total_len, total_len, dtype=torch.bool).tril()  # (T, T)
    for b, lens in enumerate(seq_lens):
        seg = torch.arange(total_len)  # padding: each position its own segment
        start = 0
        for i, n in enumerate(lens):
            seg[start : start + n] = -1 - i
            start += n
        allowed = causal & (seg[:, None] == seg[None, :])  # (T, T)
        mask[b, 0].masked_fill_(allowed, 0.0)
    return mask


def collate(
    batch: list[dict[str, list[int]]],
    pad_token_id: int,
    packing: bool,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row and build the attention mask.

    Returns ``input_ids`` (B, T) padded with ``pad_token_id``, ``labels`` (B, T) padded with -100,
    ``position_ids`` (B, T) and ``attention_mask``:
      * ``packing=False``: (B, T) long, 1 on tokens and 0 on padding; ``position_ids`` = 0..len-1.
      * ``packing=True``: rows from ``pack_examples``; (B, 1, T, T) additive float mask in ``mask_dtype``
        (pass the model's dtype) from ``block_causal_mask``, and the rows' restarting ``position_ids``.
        (FlashAttention-2 needs no mask: it reads example boundaries from ``position_ids``.)
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if packing and any("seq_lens" not in row for row in batch):
        raise ValueError("collate(packing=True) needs rows from pack_examples (with 'seq_lens')")
    width = max(len(row["input_ids"]) for row in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"])
        labels[b, :n] = torch.tensor(row["labels"])
        if packing:
            position_ids[b, :n] = torch.tensor(row["position_ids"])
        else:
            position_ids[b, :n] = torch.arange(n)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if packing:
        out["attention_mask"] = block_causal_mask([row["seq_lens"] for row in batch], width, mask_dtype)
    else:
        lengths = torch.tensor([len(row["input_ids"]) for row in batch])
        out["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, T)
    return out


# ------------------------------------------------------------------------------------------ debugging


def format_debug(example_ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """Token-by-token view of one example: index, id, token text and label; masked tokens marked.

    Trained tokens show ``label=<id>``; masked ones ``label=-100 (masked)``. A label that differs from its
    input id (only possible with hand-made labels) is flagged ``!= input``. The last line counts the tokens
    that take loss.
    """
    if len(example_ids) != len(labels):
        raise ValueError(f"{len(example_ids)} input ids but {len(labels)} labels")
    lines = []
    for i, (tok, label) in enumerate(zip(example_ids, labels, strict=True)):
        piece = repr(tokenizer.decode([tok]))
        if label == IGNORE_INDEX:
            mark = "label=-100 (masked)"
        else:
            mark = f"label={label}" + ("  != input" if label != tok else "")
        lines.append(f"{i:>5}  {tok:>7}  {piece:<24} {mark}")
    n_trained = sum(label != IGNORE_INDEX for label in labels[1:])
    lines.append(f"{len(example_ids)} tokens, {n_trained} with loss (labels[0] never counts: labels shift)")
    return "\n".join(lines)
