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

from lorakit.train.data import IGNORE_INDEX, DataConfig, load_records

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_base_model(name_or_path: str, torch_dtype: str = "float32", quantization: Any = None,
                    attn_implementation: str | None = None, revision: str | None = None,
                    trust_remote_code: bool = False, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a causal LM; `quantization` is a train.config.QuantizationConfig or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.quant.gguf_in import find_gguf

    find_gguf(name_or_path)  # a missing .gguf file fails here with its own message, not as a Hub id
    with model_path_errors(name_or_path):
        return _load_base_model(AutoModelForCausalLM, AutoTokenizer, name_or_path, torch_dtype, quantization,
                                attn_implementation, revision, trust_remote_code, device)


@contextlib.contextmanager
def model_path_errors(name_or_path: str | os.PathLike, what: str = "model") -> Iterator[None]:
    """Turn the OSError transformers raises for a missing local folder / unreachable Hub id into a
    FileNotFoundError that says where relative paths are taken from (errors inside a real folder pass).

    A missing path that cannot be a Hub id (``./x``, ``/x``, ``~/x``, ``a/b/c``) fails at once, before
    transformers spends its retries asking the Hub for it; so does an adapter folder given as a model (unless
    `what` is "tokenizer")."""
    where = f"relative paths are taken from the current directory, {os.getcwd()}"
    adapter_config = os.path.join(name_or_path, "adapter_config.json")
    if what != "tokenizer" and os.path.isfile(adapter_config):  # transformers would attach it (through PEFT)
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ValueError(f"{what} {str(name_or_path)!r} holds a model and an adapter (adapter_config.json): "
                             "transformers would load the model with that adapter attached. Move the adapter files "
                             "(adapter_config.json, adapter_model.*) to their own folder.")
        import json

        with open(adapter_config) as f:
            base = json.load(f).get("base_model_name_or_path")
        raise ValueError(f"{what} {str(name_or_path)!r} is an adapter folder (adapter_config.json, no config.json), "
                         f"not a model: give its base model ({base!r}) as the {what}, and this folder as the "
                         "adapter (model.adapter_name_or_path in a config, --adapter for generate / chat / merge)")
    if is_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"{what} {str(name_or_path)!r} is not a folder ({where}); give the path of a "
                                "local model folder")
    try:
        yield
    except ValueError as err:  # transformers lists every causal-LM config class (a screen of names)
        if not str(err).startswith("Unrecognized configuration class"):
            raise
        config = str(err).split("<class '", 1)[-1].split("'", 1)[0].rsplit(".", 1)[-1]
        raise ValueError(f"{what} {str(name_or_path)!r} has a {config}, which has no causal-LM class in "
                         "transformers (AutoModelForCausalLM): lorakit trains and inspects decoder (causal) language "
                         "models") from None
    except OSError as err:
        if os.path.isdir(name_or_path) or isinstance(err, FileNotFoundError) and os.path.exists(name_or_path):
            raise
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r} is not a folder ({where}) and could not be read from the Hugging Face "
            f"Hub ({type(err).__name__}). Give the path of a local model folder, or a Hub id with network access "
            "or a filled cache (without network, HF_HUB_OFFLINE=1 skips the Hub's retries)."
        ) from err


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` can only be a local path, not a Hub id (``namespace/name``)."""
    text = str(name_or_path)
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def _load_base_model(AutoModelForCausalLM: Any, AutoTokenizer: Any, name_or_path: str, torch_dtype: str,  # noqa: N803
                     quantization: Any, attn_implementation: str | None, revision: str | None,
                     trust_remote_code: bool, device: str | torch.device) -> tuple[nn.Module, Any]:
    from lorakit.quant.gguf_in import find_gguf, load_gguf

    if quantization is not None and quantization.method != "none":
        from lorakit.quant.load import load_model

        bnb = bnb_config(quantization)
        dtype = None if torch_dtype == "auto" else DTYPES[torch_dtype]
        model, tokenizer = load_model(name_or_path, quantization_config=bnb, torch_dtype=dtype, device=device,
                                      attn_implementation=attn_implementation, revision=revision,
                                      trust_remote_code=trust_remote_code)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                                      trust_remote_code=trust_remote_code)
    elif (gguf_file := find_gguf(name_or_path)) is not None:
        model, tokenizer = load_gguf(gguf_file, None if torch_dtype == "auto" else DTYPES[torch_dtype], device,
                                     attn_implementation)
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


def bnb_config(q: Any) -> Any:
    """The `lorakit.quant.BitsAndBytesConfig` of a train.config.QuantizationConfig whose method is not "none"."""
    from lorakit.quant.config import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=q.method in ("nf4", "fp4"), load_in_8bit=q.method == "int8",
        bnb_4bit_quant_type=q.method if q.method in ("nf4", "fp4") else "nf4",
        bnb_4bit_compute_dtype=DTYPES[q.bnb_4bit_compute_dtype],
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_quant_storage=q.bnb_4bit_quant_storage,
        llm_int8_threshold=q.llm_int8_threshold, llm_int8_skip_modules=q.llm_int8_skip_modules,
    )


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens that take loss: labels are unshifted, so position 0 never counts."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


@dataclass
class GenerationExample:
    prompt_ids: list[int]
    expected: str


def _eval_records(path: str, data_cfg: DataConfig, prompt_field: str, answer_field: str) -> tuple[Any, str | None]:
    """(records, format): `prompt_field` / `answer_field` columns when the file has both (format None: still to
    be put in the training format), else the file read like the training data."""
    from dataclasses import replace

    from lorakit.train.data import _load_dataset, _resolve_format

    raw = _load_dataset(path, "train", "evaluation.path")
    if len(raw) == 0:
        raise ValueError(f"evaluation.path {path!r} is empty (0 records)")
    if prompt_field in raw.column_names and answer_field in raw.column_names:
        return raw, None
    for option, name, default in (("prompt_field", prompt_field, "prompt"), ("answer_field", answer_field, "answer")):
        if name != default and name not in raw.column_names:  # set on purpose: never fall back silently
            raise ValueError(f"evaluation.{option}={name!r} is not a column of evaluation.path {path!r}; its "
                             f"columns are {sorted(raw.column_names)}")
    cfg = replace(data_cfg, path=path, validation_path=None, val_set_size=0, max_examples=None)
    try:
        fmt = _resolve_format(cfg, raw.column_names)
    except ValueError:
        fmt = None
    if fmt is None or fmt == "text":
        raise ValueError(
            f"evaluation.path {path!r}: exact match needs a prompt and an answer per record, but its columns are "
            f"{sorted(raw.column_names)}: give the columns evaluation.prompt_field={prompt_field!r} and "
            f"evaluation.answer_field={answer_field!r} (or set those two options to your column names), or "
            "records in the training data's format (not 'text', which has no prompt)")
    return load_records(cfg, split="train", key="evaluation.path"), fmt


def check_eval_file(path: str, data_cfg: DataConfig, prompt_field: str, answer_field: str) -> None:
    """Raise the errors `generation_examples` would raise about the file, before any model is loaded."""
    _eval_records(path, data_cfg, prompt_field, answer_field)


def _as_training_format(prompt: str, answer: str, fmt: str) -> tuple[dict[str, Any], str]:
    """A prompt/answer pair as a record of the training data's format (text data: prompt_completion)."""
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}, fmt
    if fmt == "alpaca":
        return {"instruction": prompt, "input": "", "output": answer}, fmt
    return {"prompt": prompt, "completion": answer}, "prompt_completion"


def generation_examples(path: str, data_cfg: DataConfig, tokenizer: Any, max_examples: int, max_seq_length: int,
                        train_format: str = "prompt_completion", prompt_field: str = "prompt",
                        answer_field: str = "answer") -> tuple[list[GenerationExample], int]:
    """Held-out records split where the loss starts: ([(prompt ids, expected text)], records skipped).

    A file with the columns `prompt_field` and `answer_field` is put in the training data's format
    (`train_format`: a user turn and an assistant turn for chats, the alpaca template, or prompt then
    answer verbatim); any other file must be in the training data's format itself. The prompt is the token
    prefix the model sees in training before the first trained token, so the check matches training.
    Records whose answer is cut off entirely by `max_seq_length` are skipped and counted; a ValueError
    when every record is.
    """
    from lorakit.train.data import tokenize_record

    records, fmt = _eval_records(path, data_cfg, prompt_field, answer_field)
    if fmt is not None and fmt != train_format and (fmt, train_format) != ("prompt_completion", "text"):
        raise ValueError(
            f"evaluation.path {path!r} holds {fmt!r} records, the training data {train_format!r} ones: its prompts "
            "would not look like the ones the model is trained on. Give records in the training data's format, "
            f"or the columns evaluation.prompt_field={prompt_field!r} and evaluation.answer_field={answer_field!r} "
            "(put in the training format for you)")
    out, skipped = [], 0
    for i, record in enumerate(records.select(range(min(max_examples, len(records))))):
        rec_fmt = fmt
        if fmt is None:
            for col in (prompt_field, answer_field):
                if not isinstance(record[col], str):
                    raise ValueError(f"evaluation.path {path!r} record {i}: column {col!r} must be a string, "
                                     f"got {record[col]!r:.60}")
            record, rec_fmt = _as_training_format(record[prompt_field], record[answer_field], train_format)
        ex = tokenize_record(record, i, tokenizer, rec_fmt, max_seq_length, False, f"evaluation.path {path!r}",
                             data_cfg)
        first = next((j for j, label in enumerate(ex["labels"]) if label != IGNORE_INDEX), None)
        if not first:  # no answer token left (or nothing before it to prompt with)
            skipped += 1
            continue
        answer = [t for t in ex["labels"][first:] if t != IGNORE_INDEX]
        out.append(GenerationExample(ex["input_ids"][:first], tokenizer.decode(answer, skip_special_tokens=True)))
    if not out:
        raise ValueError(f"evaluation.path {path!r}: every one of its {skipped} records has its answer cut off "
                         f"by training.max_seq_length={max_seq_length}; raise it or shorten the prompts")
    return out, skipped


def _normalize(text: str, expected: str) -> str:
    text = text.strip()
    if "\n" not in expected.strip():  # a one-line answer: the first line of the generation counts
        text = text.split("\n", 1)[0].strip()
    return text


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, examples: list[GenerationExample], max_new_tokens: int,
                batch_size: int = 16, sharded: bool = False) -> tuple[float, list[tuple[str, str]]]:
    """Fraction of examples whose greedy continuation equals the expected answer (stripped; first line).

    Prompts are left-padded in batches. Returns (accuracy, [(generated, expected), ...]) in the order of
    `examples`. With `sharded` (every process of an FSDP run calls this with its shard of the model) process r
    generates examples r, r + P, ... with ``generate(synced_gpus=True)``, so that a process that is done keeps
    running the collective forwards until all are; the pairs are gathered on every process.
    """
    from lorakit.train.distributed import map_in_lockstep

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(index: list[int]) -> dict[int, str]:
        chunk = [examples[j] for j in index] or examples[:1]  # a filler batch, not counted
        width = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            mask[b, width - len(e.prompt_ids):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **({"synced_gpus": True} if sharded
                                                                                  else {}))
        return {j: tokenizer.decode(out[b, width:], skip_special_tokens=True) for b, j in enumerate(index)}

    texts = map_in_lockstep(len(examples), batch_size, generate, sharded, device)
    model.train(was_training)
    pairs = [(texts[j], e.expected) for j, e in enumerate(examples)]
    hits = sum(_normalize(gen, exp) == exp.strip() for gen, exp in pairs)
    return hits / max(1, len(pairs)), pairs


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy), capped to avoid overflow for a diverged run."""
    return math.exp(min(loss, 50.0))
