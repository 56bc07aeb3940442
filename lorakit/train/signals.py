"""SIGINT / SIGTERM during training: finish the step, write a resumable checkpoint, stop.

Schedulers and ``docker stop`` send SIGTERM, a terminal Ctrl-C sends SIGINT. Inside `StopOnSignal` (from the
model's loading to the end of the loop) the first one only sets `signum`; the loop checks it before its first
step and after each optimizer step, writes a checkpoint (when a step ran) and raises `TrainingInterrupted` (the
command exits ``128 + signum``: 130 / 143). A second signal raises `TrainingInterrupted` at once, without a
checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM; `checkpoint` is the one written on the way out (None: none written)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopOnSignal:
    """While entered (main thread only), SIGINT / SIGTERM ask the loop to stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise TrainingInterrupted(signum)
        self.signum = signum
        print(f"\n[lorakit] {signal.Signals(signum).name}: finishing this step and writing a checkpoint, then "
              "stopping (send it again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (idempotent): from here on a signal acts as it did before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()
