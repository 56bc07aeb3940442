"""Atomic file and folder writes, and adapter-file lookup (local folder or Hub repo).

Promises (tests in ``tests/reliability/test_library_saves.py``):

* a folder written with :func:`atomic_directory` is replaced as a whole: a process killed at any file call
  leaves the old folder or the new one, never a mix (on Linux and macOS, which swap two folders in one call);
* temporary folders ``.tmp-<name>-<pid>-<random>`` left beside the target by a killed save are removed by the
  next save of the same target;
* what is written gets the permissions the process umask gives (``0o666 & ~umask`` for files, ``0o777 & ~umask``
  for folders), not the 0600 / 0700 of ``mkstemp`` / ``mkdtemp`` and safetensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any


class AdapterNotFoundError(FileNotFoundError, ValueError):
    """An adapter folder, file or Hub repo that is not there. A ``ValueError`` too, as PEFT raises for a missing
    adapter, so PEFT code that catches ``ValueError`` (e.g. to create the adapter when none was saved) still runs."""


class DamagedFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, garbage, non-finite weights)."""


def current_umask() -> int:
    """The process umask, read without changing it where the system shows it (Linux ``/proc``); elsewhere set
    and restored at once (``os.umask`` has no read-only form)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(paths: Iterable[str]) -> None:
    """Give each path the mode a plain ``open`` / ``mkdir`` would: ``0o666 & ~umask`` for a file,
    ``0o777 & ~umask`` for a folder (symlinks are left alone)."""
    mask = current_umask()
    for path in paths:
        if os.path.islink(path):
            continue
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a reader
    never sees a half-written file. The file gets the umask's permissions."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _temp_name(name: str) -> re.Pattern[str]:
    """``.tmp-<name>-<pid>-<mkdtemp's 8 random characters>``: the pid tells a live save from a killed one."""
    return re.compile(rf"\.tmp-{re.escape(name)}-(\d+)-[a-z0-9_]{{8}}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temporaries(final_dir: str | os.PathLike) -> list[str]:
    """Remove the ``.tmp-<name>-<pid>-*`` folders beside ``final_dir`` that a killed save of it left (their process
    is gone; a live save's folder is kept). Returns the paths removed."""
    final_dir = os.path.abspath(os.fspath(final_dir))
    parent, pattern = os.path.dirname(final_dir), _temp_name(os.path.basename(final_dir))
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(parent):
            match = pattern.fullmatch(entry.name)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


def _fsync(path: str) -> None:
    """Flush a file's or a folder's entries to disk (a folder cannot be opened for that on every system)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # Linux renameat2 flag (include/uapi/linux/fs.h); macOS renamex_np's RENAME_SWAP is 2 too
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one system call (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(
    RENAME_SWAP)``). Returns False where the system or file system has no such call; raises ``OSError`` otherwise.
    Raises the audit event ``lorakit.exchange`` first (the fault-injection point of the kill tests)."""
    sys.audit("lorakit.exchange", a, b)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    elif hasattr(libc, "renamex_np"):
        result = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE)
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # no atomic swap on this file system
        return False
    raise OSError(err, f"cannot swap {b!r} with the folder written beside it: {os.strerror(err)}", b)


def _carry_over(old: str, new: str, skip: set[str], move: bool) -> None:
    """Bring every entry of the folder ``old`` that ``new`` lacks into ``new`` at the same relative path: hard links
    (a copy where the file system has none) unless ``move``, then ``os.rename``. Paths in ``skip`` (relative) and
    entries whose place in ``new`` is taken (a file where ``new`` has a folder, or the reverse) are left out."""
    for root, dirs, files in os.walk(old):
        rel_root = os.path.relpath(root, old)
        kept = []
        for name in dirs:
            src, rel = os.path.join(root, name), os.path.normpath(os.path.join(rel_root, name))
            dst = os.path.join(new, rel)
            if rel in skip:
                continue
            if os.path.islink(src):  # a symlink to a folder: one entry, not descended into
                if not os.path.lexists(dst):
                    os.rename(src, dst) if move else os.symlink(os.readlink(src), dst)
                continue
            if not os.path.lexists(dst):
                if move:  # the whole subtree at once
                    os.rename(src, dst)
                    continue
                os.mkdir(dst)
                shutil.copymode(src, dst)
            if os.path.isdir(dst) and not os.path.islink(dst):
                kept.append(name)
        dirs[:] = kept
        for name in files:
            src, rel = os.path.join(root, name), os.path.normpath(os.path.join(rel_root, name))
            dst = os.path.join(new, rel)
            if rel in skip or os.path.lexists(dst):
                continue
            if move:
                os.rename(src, dst)
            elif os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            else:
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:  # no hard links here (some network / FUSE file systems)
                    shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike, stale: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh folder beside ``final_dir``; when the body returns, it replaces ``final_dir`` as a whole.

    1. Stale temporaries of a killed save of ``final_dir`` are removed (:func:`clean_stale_temporaries`).
    2. The body writes its files into ``.tmp-<name>-<pid>-<random>`` beside ``final_dir``; they get the umask's
       permissions and are fsynced.
    3. If ``final_dir`` exists, every entry of it the body did not write is carried over (hard links: no data is
       copied), except the ``stale`` paths (relative, e.g. the other weight format's file): other adapters'
       subfolders, a Trainer's checkpoints, a user's notes are kept, as when saving into a folder file by file.
    4. The two folders are swapped in one system call (:func:`exchange`); a new ``final_dir`` is one rename.
    5. Entries another process created in the old folder during the save are moved over; the old folder (now at
       the temporary name) is deleted.

    A kill before step 4 leaves the old folder untouched, after it the new one complete; the temporary folder is
    removed by the next save of the same target. Where no swap call exists (not Linux or macOS, or a file system
    without it) step 4 is two renames, with a moment in which ``final_dir`` does not exist.

    Files the body writes into ``final_dir`` itself while it runs, or another process writes there during the save,
    may be lost; a folder that is the current directory is followed (``os.chdir`` to the new one).
    """
    final_dir = os.path.realpath(os.fspath(final_dir))  # a symlinked target: replace the folder it points to
    parent, name = os.path.split(final_dir)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temporaries(final_dir)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        written = [tmp]
        for root, dirs, files in os.walk(tmp):
            written += [os.path.join(root, n) for n in dirs + files]
        apply_umask(written)
        for path in reversed(written):  # files, then the folders that list them
            if not os.path.islink(path):
                _fsync(path)
        if not os.path.isdir(final_dir):
            os.rename(tmp, final_dir)
            _fsync(parent)
            return
        shutil.copymode(final_dir, tmp)
        _carry_over(final_dir, tmp, set(stale), move=False)
        cwd = _cwd_or_none()
        if not exchange(tmp, final_dir):
            old = tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-", dir=parent)
            os.rename(final_dir, old)  # onto the empty folder
            os.rename(tmp, final_dir)
            tmp = old
        _fsync(parent)
        if cwd is not None and (cwd + os.sep).startswith(final_dir + os.sep) and os.path.isdir(cwd):
            os.chdir(cwd)  # the process was inside the old folder: follow the path to the new one
        _carry_over(tmp, final_dir, set(stale), move=True)  # (now tmp holds the old folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cwd_or_none() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def looks_like_local_path(path: str) -> bool:
    """A path rather than a Hub id ``owner/name``: absolute, starting with ``.`` or ``~``, ending in a separator,
    with more than one ``/``, or with a character a repo id cannot hold."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.endswith(("/", os.sep)):
        return True
    if os.sep != "/" and os.sep in path:
        return True
    return path.count("/") != 1 or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", path)


def resolve_file(
    path_or_repo: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs: Any
) -> str | None:
    """Return a local path to ``filename`` in a local folder or a Hub repo, or None if the folder or repo exists
    without it. A folder that does not exist, a Hub repo that cannot be read and an offline Hub
    (``HF_HUB_OFFLINE``, answered from the cache only, without retries) raise ``AdapterNotFoundError`` saying
    which."""
    name = os.fspath(path_or_repo)
    local = os.path.join(name, subfolder or "", filename)
    if os.path.isdir(name):
        return local if os.path.isfile(local) else None
    if os.path.exists(name):
        raise AdapterNotFoundError(f"{name!r} is a file, not an adapter folder: give the folder that holds it.")
    if looks_like_local_path(name):
        raise AdapterNotFoundError(
            f"{name!r} does not exist (relative paths are taken from the current directory, {os.getcwd()})."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    from lorakit.io.load import hub_kwarg_names

    allowed = hub_kwarg_names() - {"use_auth_token"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed}
    if _hub_offline():
        kwargs["local_files_only"] = True  # no network call, no retries: the cache answers or nothing does
    try:
        return hf_hub_download(name, filename, subfolder=subfolder or None, **kwargs)
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: caught first)
        if _hub_offline() or kwargs.get("local_files_only"):
            raise AdapterNotFoundError(
                f"{name!r} is not a local folder (it does not exist here), and the Hub is offline (HF_HUB_OFFLINE"
                f"{'=' + os.environ['HF_HUB_OFFLINE'] if 'HF_HUB_OFFLINE' in os.environ else ''} or "
                f"local_files_only) with no cached {filename} for it. Check the path, or download it with the Hub "
                "reachable."
            ) from e
        raise AdapterNotFoundError(
            f"{name!r} is not a local folder (it does not exist here), and the Hub could not be reached to read it "
            f"({type(e).__name__}). Check the path, or your network (set HF_HUB_OFFLINE=1 to use the cache only)."
        ) from e
    except EntryNotFoundError:
        return None
    except (HFValidationError, OSError) as e:  # RepositoryNotFoundError and network errors are OSErrors too
        raise AdapterNotFoundError(
            f"{name!r} is not a local folder (it does not exist here), and no Hub repository of that name could "
            f"be read ({type(e).__name__}). Check the path, or the repo id and your token."
        ) from e
