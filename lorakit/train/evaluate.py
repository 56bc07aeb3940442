"""Evaluation: loss and perplexity on held-out examples, exact match by greedy generation, model loading."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.train.data import IGNORE_INDEX, DataConfig, load_records, record_format, tokenize_example

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_base_model(name_or_path: str, torch_dtype: str = "float32", quantization: Any = None,
                    attn_implementation: str | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a causal LM; `quantization` is a train.config.QuantizationConfig or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with model_path_errors(name_or_path):
        return _load_base_model(AutoModelForCausalLM, AutoTokenizer, name_or_path, torch_dtype, quantization,
                                attn_implementation, revision, trust_remote_code, device)


@contextlib.contextmanager
def model_path_errors(name_or_path: str | os.PathLike, what: str = "model") -> Iterator[None]:
    """Turn the OSError transformers raises for a missing local folder / unreachable Hub id into a
    FileNotFoundError that says where relative paths are taken from (errors inside a real folder pass)."""
    try:
        yield
    except OSError as err:
        if os.path.isdir(name_or_path) or isinstance(err, FileNotFoundError) and os.path.exists(name_or_path):
            raise
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r} is not a folder (relative paths are taken from the current directory, "
            f"{os.getcwd()}) and could not be read from the Hugging Face Hub ({type(err).__name__}). Give the "
            "path of a local model folder, or a Hub id with network access or a filled cache."
        ) from err


def _load_base_model(AutoModelForCausalLM: Any, AutoTokenizer: Any, name_or_path: str, torch_dtype: str,  # noqa: N803
                     quantization: Any, attn_implementation: str | None, revision: str | None,
                     trust_remote_code: bool, device: str | torch.device) -> tuple[nn.Module, Any]:

    if quantization is not None and quantization.method != "none":
        from lorakit.quant.config import BitsAndBytesConfig
        from lorakit.quant.load import load_model

        q = quantization
        bnb = BitsAndBytesConfig(
            load_in_4bit=q.method in ("nf4", "fp4"), load_in_8bit=q.method == "int8",
            bnb_4bit_quant_type=q.method if q.method in ("nf4", "fp4") else "nf4",
            bnb_4bit_compute_dtype=DTYPES[q.bnb_4bit_compute_dtype],
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_quant_storage=q.bnb_4bit_quant_storage,
            llm_int8_threshold=q.llm_int8_threshold, llm_int8_skip_modules=q.llm_int8_skip_modules,
        )
        dtype = None if torch_dtype == "auto" else DTYPES[torch_dtype]
        model, tokenizer = load_model(name_or_path, quantization_config=bnb, torch_dtype=dtype, device=device)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                      trust_remote_code=trust_remote_code)
    else:
        kwargs: dict[str, Any] = {"dtype": DTYPES[torch_dtype], "revision": revision,
                                  "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).to(device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                  trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:  # common for base LMs: pad with EOS (padding never takes loss)
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens that take loss: labels are unshifted, so position 0 never counts."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


@dataclass
class GenerationExample:
    prompt_ids: list[int]
    expected: str


def generation_examples(path: str, data_cfg: DataConfig, tokenizer: Any, max_examples: int,
                        max_seq_length: int) -> list[GenerationExample]:
    """Held-out records in the training format, split where the loss starts: (prompt ids, expected text).

    The prompt is exactly the token prefix the model saw in training before the first trained token, so the
    check works for every data format (chat template, alpaca template, prompt/completion).
    """
    from dataclasses import replace

    cfg = replace(data_cfg, path=path, validation_path=None, val_set_size=0, max_examples=None)
    records = load_records(cfg)
    fmt = record_format(records)
    if fmt == "text":
        raise ValueError(f"evaluation.path {path!r}: exact match needs a prompt and an answer; "
                         "the text format has no prompt")
    out = []
    for record in records.select(range(min(max_examples, len(records)))):
        ex = tokenize_example(record, tokenizer, fmt, max_seq_length, train_on_inputs=False)
        first = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
        answer = [t for t in ex["labels"][first:] if t != IGNORE_INDEX]
        out.append(GenerationExample(ex["input_ids"][:first], tokenizer.decode(answer, skip_special_tokens=True)))
    return out


def _normalize(text: str, expected: str) -> str:
    text = text.strip()
    if "\n" not in expected.strip():  # a one-line answer: the first line of the generation counts
        text = text.split("\n", 1)[0].strip()
    return text


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, examples: list[GenerationExample], max_new_tokens: int,
                batch_size: int = 16) -> tuple[float, list[tuple[str, str]]]:
    """Fraction of examples whose greedy continuation equals the expected answer (stripped; first line).

    Prompts are left-padded in batches. Returns (accuracy, [(generated, expected), ...]).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            mask[b, width - len(e.prompt_ids):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for b, e in enumerate(chunk):
            pairs.append((tokenizer.decode(out[b, width:], skip_special_tokens=True), e.expected))
    model.train(was_training)
    hits = sum(_normalize(gen, exp) == exp.strip() for gen, exp in pairs)
    return hits / max(1, len(pairs)), pairs


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy), capped to avoid overflow for a diverged run."""
    return math.exp(min(loss, 50.0))
