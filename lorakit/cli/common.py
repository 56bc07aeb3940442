"""Helpers shared by the `lorakit` verbs: argparse value types, dtype names, damaged-file errors."""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Callable, Iterator

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
"""--dtype spellings -> torch dtype names."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def shard_size(text: str) -> str:
    """argparse type: a safetensors shard size as save_pretrained takes it (a number and KB, MB, GB or TB)."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", text, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 2GB (units: KB, MB, GB, TB)")
    return text


@contextlib.contextmanager
def damaged_file_errors(adapter: str) -> Iterator[None]:
    """A truncated, corrupt or non-finite adapter file as a ValueError naming the --adapter it came from
    (safetensors raises its own SafetensorError, which would print a traceback)."""
    from safetensors import SafetensorError

    from lorakit.io.files import DamagedFileError

    try:
        yield
    except (SafetensorError, DamagedFileError) as err:
        cause = err.__cause__ if isinstance(err.__cause__, SafetensorError) else err
        if isinstance(cause, SafetensorError):
            raise ValueError(f"--adapter {adapter!r}: its safetensors file is damaged or incomplete ({cause}); save "
                             "or copy the adapter again") from err
        raise ValueError(f"--adapter {adapter!r}: {err}") from err
