"""Preference data: (prompt, chosen, rejected) pairs and KTO's (prompt, completion, label), tokenized with masks.

Records (JSON Lines, CSV, Parquet, a dataset folder or a Hub dataset, as for SFT)::

    {"prompt": "second word: a b c\\nanswer:", "chosen": " b", "rejected": " c"}                  # strings
    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "b"}],
     "rejected": [{"role": "assistant", "content": "c"}]}                                        # messages
    {"prompt": "...", "completion": " b", "label": true}                                          # kto

Each completion is tokenized together with its prompt by `lorakit.train.data.tokenize_segments` (the SFT
code): strings as ``prompt_completion`` (prompt verbatim, completion trained, EOS appended), message lists
with the tokenizer's chat template (``chat_segments`` of prompt + completion) with every token of the
rendered prompt masked, so the loss is on the completion only. ``data.prompt_field`` and
``data.completion_field`` rename the prompt and KTO completion columns.

A paired row is ``{"chosen": {"input_ids", "labels"}, "rejected": {...}}``; a KTO row is
``{"input_ids", "labels", "desirable", "kl": {"input_ids", "labels"}}`` where ``kl`` is the prompt of this
record with the completion of the previous one (the mismatched pairs of KTO's KL estimate; fixed at load
time, so reference log-probs can be precomputed).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lorakit.train.data import IGNORE_INDEX, DataConfig, _load_dataset, collate, format_debug, tokenize_segments
from lorakit.train.templates import Segment, _render, chat_segments

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
KTO_COLUMNS = ("prompt", "completion", "label")


def columns_for(method: str) -> tuple[str, ...]:
    """The canonical columns `method` reads."""
    return KTO_COLUMNS if method == "kto" else PAIR_COLUMNS


class RecordError(ValueError):
    """A record that cannot be trained on; the message names the split, the record and the fix."""


def _segments(prompt: Any, completion: Any, tokenizer: Any, name: str) -> tuple[list[Segment], bool]:
    """(segments with only the completion trained, whether they are a rendered chat)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ValueError(f"{name!r} is empty")
        return [(prompt, False), (completion, True)], False
    if isinstance(prompt, list) and isinstance(completion, list):
        if not completion or all(not m.get("content") for m in completion if isinstance(m, dict)):
            raise ValueError(f"{name!r} is empty")
        segments = chat_segments(prompt + completion, tokenizer)
        cut = len(_render(tokenizer, prompt, add_generation_prompt=True)) if prompt else 0
        out, pos = [], 0  # the rendered prompt is never trained, even where it holds assistant turns
        for text, trained in segments:
            head = text[: max(0, cut - pos)]
            if head:
                out.append((head, False))
            if len(head) < len(text):
                out.append((text[len(head):], trained))
            pos += len(text)
        return out, True
    kinds = f"prompt is {type(prompt).__name__}, {name} is {type(completion).__name__}"
    raise ValueError(f"prompt and {name} must both be strings or both be message lists ({kinds})")


def tokenize_completion(prompt: Any, completion: Any, tokenizer: Any, max_seq_length: int, name: str
                        ) -> dict[str, Any]:
    """``{"input_ids", "labels", "truncated"}`` of prompt + completion, loss on the completion only."""
    segments, chat = _segments(prompt, completion, tokenizer, name)
    ex = tokenize_segments(segments, tokenizer, chat, max_seq_length)
    if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
        n_prompt = len(tokenize_segments([(s, False) for s, t in segments if not t], tokenizer, chat, 10**9,
                                         )["input_ids"])
        raise ValueError(f"the prompt has {n_prompt} tokens and training.max_seq_length={max_seq_length}: "
                         f"truncation would cut the whole {name}. Raise training.max_seq_length or shorten the prompt")
    return ex


def _field(record: dict[str, Any], column: str, source: str) -> Any:
    value = record.get(column)
    if value is None:
        raise ValueError(f"column {column!r}{source} is missing or null")
    if not isinstance(value, str | list):
        raise ValueError(f"column {column!r}{source} must be a string or a list of messages, "
                         f"got {type(value).__name__} ({value!r:.60})")
    return value


def tokenize_record(record: dict[str, Any], method: str, tokenizer: Any, max_seq_length: int, cfg: DataConfig
                    ) -> dict[str, Any]:
    """One row (module docstring) of a canonical record; ValueError names the column and the problem."""
    src = {"prompt": f" (data.prompt_field={cfg.prompt_field!r})" if cfg.prompt_field != "prompt" else "",
           "completion": f" (data.completion_field={cfg.completion_field!r})"
           if cfg.completion_field != "completion" else ""}
    prompt = _field(record, "prompt", src["prompt"])
    if method == "kto":
        label = record.get("label")
        if not isinstance(label, bool):
            raise ValueError(f"column 'label' must be true (desirable) or false (undesirable), got {label!r}")
        ex = tokenize_completion(prompt, _field(record, "completion", src["completion"]), tokenizer,
                                 max_seq_length, "completion")
        return {"input_ids": ex["input_ids"], "labels": ex["labels"], "desirable": label,
                "truncated": ex["truncated"]}
    chosen, rejected = _field(record, "chosen", ""), _field(record, "rejected", "")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same: the pair prefers nothing")
    c = tokenize_completion(prompt, chosen, tokenizer, max_seq_length, "chosen")
    r = tokenize_completion(prompt, rejected, tokenizer, max_seq_length, "rejected")
    return {"chosen": {"input_ids": c["input_ids"], "labels": c["labels"]},
            "rejected": {"input_ids": r["input_ids"], "labels": r["labels"]},
            "truncated": c["truncated"] or r["truncated"]}


def _completion_start(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def add_kl_rows(rows: list[dict[str, Any]], max_seq_length: int) -> None:
    """KTO: give row i the mismatched sequence prompt(i) + completion(i - 1) (row 0 takes the last one)."""
    for i, row in enumerate(rows):
        prev = rows[i - 1]
        a, b = _completion_start(row["labels"]), _completion_start(prev["labels"])
        row["kl"] = {"input_ids": (row["input_ids"][:a] + prev["input_ids"][b:])[:max_seq_length],
                     "labels": ([IGNORE_INDEX] * a + prev["labels"][b:])[:max_seq_length]}


def _records(cfg: DataConfig, method: str, path: str, split: str, key: str) -> Any:
    ds = _load_dataset(path, split, key)
    if len(ds) == 0:
        raise ValueError(f"{key}: dataset {path!r} is empty (0 records)")
    renames = {cfg.prompt_field: "prompt"} | ({cfg.completion_field: "completion"} if method == "kto" else {})
    renames = {a: b for a, b in renames.items() if a != b and a in ds.column_names}
    ds = ds.rename_columns(renames) if renames else ds
    needed = columns_for(method)
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        other = "prompt/completion/label (method: kto)" if method != "kto" else "prompt/chosen/rejected (dpo, ...)"
        raise ValueError(f"{key}={path!r}: method {method} needs the columns {list(needed)}, but {missing} "
                         f"{'is' if len(missing) == 1 else 'are'} missing (found {sorted(ds.column_names)}). "
                         f"Rename them, set data.prompt_field / data.completion_field, or, for "
                         f"{other} data, set that method")
    return ds.remove_columns([c for c in ds.column_names if c not in needed])


def _tokenize_split(ds: Any, method: str, tokenizer: Any, max_seq_length: int, cfg: DataConfig, name: str
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows, truncated = [], 0
    for i, record in enumerate(ds):
        try:
            row = tokenize_record(record, method, tokenizer, max_seq_length, cfg)
        except ValueError as err:
            raise RecordError(f"{name} data record {i}: {err}; fix or remove that record") from err
        truncated += row.pop("truncated")
        rows.append(row)
    if method == "kto":
        add_kl_rows(rows, max_seq_length)
        n_tokens = sum(len(r["input_ids"]) for r in rows)
    else:
        n_tokens = sum(len(r["chosen"]["input_ids"]) + len(r["rejected"]["input_ids"]) for r in rows)
    stats = {f"{name}_records": len(ds), f"{name}_examples": len(rows), f"{name}_tokens": n_tokens,
             f"{name}_truncated": truncated}
    if method == "kto":
        stats[f"{name}_desirable"] = sum(r["desirable"] for r in rows)
    return rows, stats


def build_preference_datasets(cfg: DataConfig, method: str, tokenizer: Any, max_seq_length: int
                              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
    """Load, split ([validation_path] or [val_set_size]) and tokenize: ``(train rows, eval rows or None, stats)``."""
    for path_key, split_key in (("path", "split"), ("validation_path", "validation_split")):
        path, split = getattr(cfg, path_key), getattr(cfg, split_key)
        if path is not None and os.path.isfile(path) and split != "train":
            raise ValueError(f"data.{split_key}={split!r} does not apply to data.{path_key}={path!r}: a local file "
                             f"has one split, 'train'. Remove data.{split_key}")
    ds = _records(cfg, method, cfg.path, cfg.split, "data.path")
    eval_ds = None
    if cfg.validation_path is not None:
        eval_ds = _records(cfg, method, cfg.validation_path, cfg.validation_split, "data.validation_path")
    elif cfg.val_set_size:
        size = cfg.val_set_size if cfg.val_set_size < 1 else int(cfg.val_set_size)
        if (math.ceil(size * len(ds)) if size < 1 else size) >= len(ds):
            raise ValueError(f"data.val_set_size={cfg.val_set_size} leaves no training records ({len(ds)} records)")
        parts = ds.train_test_split(test_size=size, seed=cfg.shuffle_seed)
        ds, eval_ds = parts["train"], parts["test"]
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if method == "kto" and len(ds) < 2:
        raise ValueError("method kto needs at least 2 training records (its KL estimate pairs each prompt with "
                         "another record's completion)")
    train, stats = _tokenize_split(ds, method, tokenizer, max_seq_length, cfg, "train")
    stats = {"format": "kto" if method == "kto" else "preference", **stats}
    evals = None
    if eval_ds is not None:
        evals, eval_stats = _tokenize_split(eval_ds, method, tokenizer, max_seq_length, cfg, "eval")
        stats.update(eval_stats)
    return train, evals, stats


def collate_preference(rows: list[dict[str, Any]], method: str, pad_token_id: int,
                       mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Rows -> the keyword arguments of `lorakit.train.losses.preference.PreferenceLoss`.

    Paired: ``input_ids``, ``labels``, ``attention_mask``, ``position_ids`` of shape (2B, T), the B chosen rows
    then the B rejected rows (one forward for both); ``ref_logps`` (2B,) where precomputed. KTO: the B rows,
    ``desirable`` (B,) bool and the ``kl_*`` tensors of their mismatched rows; ``ref_logps`` / ``ref_kl_logps``.
    """
    if method == "kto":
        out = collate(rows, pad_token_id, False, mask_dtype)
        out["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
        out.update({f"kl_{k}": v for k, v in collate([r["kl"] for r in rows], pad_token_id, False, mask_dtype).items()})
        if "ref_logps" in rows[0]:
            out["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows])
            out["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows])
        return out
    out = collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_token_id, False, mask_dtype)
    if "ref_logps" in rows[0]:
        out["ref_logps"] = torch.tensor([r["ref_logps"][0] for r in rows] + [r["ref_logps"][1] for r in rows])
    return out


def format_pair_debug(row: dict[str, Any], tokenizer: Any) -> str:
    """Token-by-token view (``format_debug``) of a pair's chosen and rejected rows, or a KTO row and its KL row."""
    if "chosen" in row:
        parts = [("chosen", row["chosen"]), ("rejected", row["rejected"])]
    else:
        parts = [("desirable" if row["desirable"] else "undesirable", row), ("KL (mismatched)", row["kl"])]
    return "\n".join(f"--- {name} ---\n{format_debug(r['input_ids'], r['labels'], tokenizer)}" for name, r in parts)
