"""Atomic file writes and adapter-file lookup (local folder or Hub repo)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """An adapter folder, file or Hub repo that is not there. A ``ValueError`` too, as PEFT raises for a missing
    adapter, so PEFT code that catches ``ValueError`` (e.g. to create the adapter when none was saved) still runs."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a reader
    never sees a half-written file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(
    final_dir: str | os.PathLike, commit_last: str = "adapter_config.json", stale: tuple[str, ...] = ()
) -> Iterator[str]:
    """Yield a fresh temporary folder beside ``final_dir``; on success its files land in ``final_dir``.

    A new ``final_dir`` appears with one ``os.rename`` of the whole folder. Into an existing folder, the old
    ``commit_last`` files being replaced are removed first, then the ``stale`` files (names relative to
    ``final_dir``, e.g. the other format's weights) the save did not write, the other files are moved in
    (``os.replace``, atomic per file) and the ``commit_last`` files last: an interrupted save leaves a folder
    without its config, which no loader takes for a complete adapter, never weights beside a config they do not
    match. Other files the save does not write (other adapters' subfolders, a user's notes) are kept. If the body
    raises, or the process dies, only a ``.tmp-*`` folder is left behind.
    """
    final_dir = os.fspath(final_dir)
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final_dir)}-", dir=parent)
    try:
        yield tmp
        if not os.path.exists(final_dir):
            os.rename(tmp, final_dir)
            return
        names = []
        for root, _dirs, files in os.walk(tmp):
            names += [os.path.relpath(os.path.join(root, name), tmp) for name in files]
        last = [n for n in names if os.path.basename(n) == commit_last]
        for rel in last + [n for n in stale if n not in names]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(final_dir, rel))
        for rel in [n for n in names if n not in last] + last:
            dst = os.path.join(final_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(os.path.join(tmp, rel), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_file(
    path_or_repo: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str | None:
    """Return a local path to ``filename`` in a local folder or a Hub repo, or None if it does not exist."""
    local = os.path.join(os.fspath(path_or_repo), subfolder or "", filename)
    if os.path.isdir(os.fspath(path_or_repo)):
        return local if os.path.isfile(local) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    from lorakit.io.load import hub_kwarg_names

    allowed = hub_kwarg_names() - {"use_auth_token"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed}
    try:
        return hf_hub_download(str(path_or_repo), filename, subfolder=subfolder or None, **kwargs)
    except EntryNotFoundError:
        return None
    except (HFValidationError, LocalEntryNotFoundError, OSError) as e:
        # RepositoryNotFoundError and network errors are OSErrors too.
        raise AdapterNotFoundError(
            f"{str(path_or_repo)!r} is not a local folder, and no Hub repository of that name could be read "
            f"({type(e).__name__}). Check the path, or the repo id and your network/cache."
        ) from e
