"""Driver for the kill tests: saves over an existing multi-adapter folder, SIGKILLed before its N-th file call.

Run as ``python kill_saves.py FOLDER``. It imports torch and lorakit once, then for N = 1, 2, ... forks a child
that arms an audit hook (``sys.addaudithook``: the fault-injection point, seen at every file call Python makes and
at lorakit's ``lorakit.exchange``) and saves; the hook kills the child with SIGKILL just before its N-th call that
changes the file system. After each kill the parent records whether the folder holds exactly the old save, exactly
the new one, or something else; then a clean save (another child) must give the new folder with no temporary
folder left beside it. Prints one JSON line: {"points": ..., "old": ..., "new": ..., "mixed": [...],
"after_next_save": [...]}.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys

#: Audit events of calls that change the file system (``open`` counts when its flags write).
CHANGING = {
    "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.chmod", "os.truncate",
    "shutil.rmtree", "shutil.copyfile", "os.utime", "lorakit.exchange",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def tree(folder: str) -> dict[str, str]:
    """{relative path: sha256 of the bytes} of every file under ``folder`` (symlinks as their target)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def temporaries(folder: str) -> list[str]:
    parent, name = os.path.split(folder)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".tmp-{name}-"))


def main(folder: str) -> None:
    import torch

    torch.set_num_threads(1)  # no thread pool that a fork could leave half-initialised
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from lorakit import LoraConfig, get_peft_model
    from tests.conftest import make_tiny_llama

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    params = [p for n, p in model.named_parameters() if ".adapters." in n]

    def set_weights(value: float) -> None:
        with torch.no_grad():
            for p in params:
                p.fill_(value)

    set_weights(1.0)
    model.save_pretrained(folder, safe_serialization=False)  # the old save: .bin, a user's notes, a run folder
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("kept")
    os.makedirs(os.path.join(folder, "runs", "1"))
    with open(os.path.join(folder, "runs", "1", "log.txt"), "w") as f:
        f.write("kept too")
    pristine = folder + "-pristine"
    shutil.copytree(folder, pristine, symlinks=True)
    old = tree(folder)

    def in_child(kill_at: int | None) -> int:
        """Save the new weights in a forked child, killed before its ``kill_at``-th changing call; the exit status."""
        pid = os.fork()
        if pid == 0:
            count = 0

            def hook(event: str, args: tuple) -> None:
                nonlocal count
                if event in CHANGING or event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS:
                    count += 1
                    if count == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

            set_weights(2.0)
            if kill_at is not None:
                sys.addaudithook(hook)
            model.save_pretrained(folder)
            os._exit(0)
        return os.waitpid(pid, 0)[1]

    def restore() -> None:
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder, symlinks=True)

    assert in_child(None) == 0
    new = tree(folder)
    assert new != old and "notes.txt" in new and "runs/1/log.txt" in new, sorted(new)
    restore()
    result: dict = {"points": 0, "old": 0, "new": 0, "mixed": [], "after_next_save": []}
    n = 0
    while True:
        n += 1
        status = in_child(n)
        if os.WIFEXITED(status):  # the save made fewer than n changing calls: every point was tried
            break
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        result["points"] += 1
        state = tree(folder) if os.path.isdir(folder) else None
        if state == old:
            result["old"] += 1
        elif state == new:
            result["new"] += 1
        else:
            result["mixed"].append(n)
        assert in_child(None) == 0  # the next save of the same target
        if tree(folder) != new or temporaries(folder):
            result["after_next_save"].append(n)
        restore()
    shutil.rmtree(pristine)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
