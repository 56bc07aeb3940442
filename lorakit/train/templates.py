"""Prompt templates for the non-chat data formats, and the segment view every format is reduced to.

Every example becomes an ordered list of ``(text, trained)`` segments; ``data.tokenize_example``
tokenizes their concatenation once and trains each token that has a character in a trained segment.
This module only builds the segments.

* ``alpaca``: Stanford Alpaca's template (https://github.com/tatsu-lab/stanford_alpaca, ``train.py``
  ``PROMPT_DICT``), with the newline after ``### Response:`` that alpaca-lora and most later recipes use.
  Loss on the response only.
* ``prompt_completion``: ``prompt`` then ``completion`` verbatim (no separator is added: put it in the
  data). Loss on the completion only.
* ``text``: one trained segment.
* ``messages``: rendered with the tokenizer's own chat template; see ``chat_segments``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Segment = tuple[str, bool]  # (text, trained)

CHAT_ROLES = ("system", "user", "assistant", "tool")


class FieldTypeError(ValueError):
    """A record whose field is missing, null or not a string; ``column`` names the (canonical) column."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column


def field_text(example: dict[str, Any], column: str, optional: bool = False) -> str:
    """``example[column]`` as a string; a missing / null value is "" when `optional`, else FieldTypeError."""
    value = example.get(column)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        what = "missing or null" if value is None else f"of type {type(value).__name__} ({value!r:.60})"
        raise FieldTypeError(column, f"column {column!r} must be a string, but is {what}")
    return value


def alpaca_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 - alpaca's column name
    """The Alpaca prompt for one example, ending right where the response starts (``"### Response:\\n"``)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_segments(example: dict[str, Any]) -> list[Segment]:
    """``[(prompt, False), (output, True)]`` for an ``instruction`` / ``input`` / ``output`` record."""
    prompt = alpaca_prompt(field_text(example, "instruction"), field_text(example, "input", optional=True))
    return [(prompt, False), (field_text(example, "output"), True)]


def prompt_completion_segments(example: dict[str, Any]) -> list[Segment]:
    """``[(prompt, False), (completion, True)]``."""
    return [(field_text(example, "prompt"), False), (field_text(example, "completion"), True)]


def text_segments(example: dict[str, Any]) -> list[Segment]:
    """``[(text, True)]``."""
    return [(field_text(example, "text"), True)]


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def chat_segments(messages: Sequence[dict[str, Any]], tokenizer: Any) -> list[Segment]:
    """Split a rendered conversation into alternating masked / assistant segments.

    The assistant spans are found by rendering prefixes of the conversation: for an assistant turn at
    index ``i``, with ``p = render(messages[:i], add_generation_prompt=True)``, its text is
    ``render(messages[:i+1])[len(p):]``
    (its content plus whatever the template closes the turn with, e.g. an end-of-turn token, so the model
    learns to stop). This works for any template whose renderings of prefixes are prefixes of the full
    rendering; a template that rewrites earlier turns (for example one that drops past reasoning) is
    reported with a ValueError rather than masked wrongly.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "format 'messages' needs a tokenizer with a chat template, and this tokenizer has none "
            "(tokenizer.chat_template is None). Use a chat/instruct model's tokenizer, set "
            "tokenizer.chat_template, or convert the data to the 'prompt_completion' or 'text' format."
        )
    if not messages:
        raise ValueError("format 'messages': an example has an empty 'messages' list")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(
                f"format 'messages': every message must be a dict with 'role' and 'content', got {m!r}"
            )
        if not isinstance(m["content"], str | list):  # a list: content parts, for templates that take them
            what = "null" if m["content"] is None else f"of type {type(m['content']).__name__}"
            raise FieldTypeError("messages", f"column 'messages': the content of a {m['role']!r} message must "
                                 f"be a string, but is {what}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"format 'messages': unknown role {m['role']!r}; allowed: {list(CHAT_ROLES)}")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    segments: list[Segment] = []
    done = 0  # characters of `full` already assigned to a segment
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        start = len(prompt)
        if not (full.startswith(prompt) and full.startswith(end_text)) or not done <= start <= len(end_text):
            raise ValueError(
                "format 'messages': this chat template does not render conversation prefixes as prefixes "
                "of the whole conversation, so assistant turns cannot be located; set "
                "train_on_inputs=True (loss on every token) or use the 'prompt_completion' format"
            )
        segments += [(full[done:start], False), (full[start : len(end_text)], True)]
        done = len(end_text)
    segments.append((full[done:], False))
    return [s for s in segments if s[0]]
