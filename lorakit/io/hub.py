"""Upload an adapter folder to the Hugging Face Hub, as PEFT's ``PeftModel.push_to_hub`` does.

PEFT's ``push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: create the repo (``exist_ok``), write the
model with ``save_pretrained`` into a temporary folder, create the branch for ``revision``, then one
``HfApi.create_commit`` adding every file (subfolders of other adapters included). This module does the same
calls on ``huggingface_hub.HfApi``, which is where the tests capture what would be uploaded (there is no network
in tests).

Offline (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, the error is a ``HubUnavailableError`` naming the Hub
and the setting, raised before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

__all__ = ["HubUnavailableError", "push_adapter_to_hub", "upload_folder_to_hub"]


class HubUnavailableError(ConnectionError):
    """The Hugging Face Hub cannot be used: offline mode is on, or it could not be reached."""


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def _unavailable(what: str, err: BaseException | None = None) -> HubUnavailableError:
    from huggingface_hub import constants

    if err is None or _offline():
        return HubUnavailableError(
            f"{what} needs the Hugging Face Hub ({constants.ENDPOINT}), but offline mode is on (HF_HUB_OFFLINE=1). "
            "Unset HF_HUB_OFFLINE to upload, or keep the files local with save_pretrained(folder)."
        )
    return HubUnavailableError(
        f"{what}: could not reach the Hugging Face Hub ({constants.ENDPOINT}): {type(err).__name__}: "
        f"{str(err).splitlines()[0][:200] if str(err) else ''}. Check the network (or set HF_HUB_OFFLINE=1 to "
        "work offline, and save_pretrained(folder) instead)."
    )


#: Base classes of the HTTP clients' network failures (httpx / huggingface_hub's httpx fork; requests' subclass
#: ConnectionError), matched by name so that no client is imported here.
_NETWORK_ERRORS = {"TransportError", "NetworkError", "TimeoutException"}


def _is_network_error(err: BaseException) -> bool:
    """True for "the Hub could not be reached" (offline mode, DNS, refused connection, timeout)."""
    if isinstance(err, (ConnectionError, TimeoutError)):  # OfflineModeIsEnabled, requests' errors
        return True
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(err).__mro__)


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    what: str = "push_to_hub",
) -> Any:
    """Upload every file of ``folder`` (one level of subfolders, as transformers does) to the model repo
    ``repo_id`` in one commit; returns ``HfApi.create_commit``'s ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if _offline():
        raise _unavailable(what)
    folder = os.fspath(folder)
    api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        operations = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                operations += [
                    CommitOperationAdd(path_or_fileobj=os.path.join(path, f), path_in_repo=f"{name}/{f}")
                    for f in sorted(os.listdir(path))
                ]
            else:
                operations.append(CommitOperationAdd(path_or_fileobj=path, path_in_repo=name))
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )
    except Exception as err:
        if _is_network_error(err):
            raise _unavailable(what, err) from err
        raise


def push_adapter_to_hub(
    model: Any, repo_id: str, *, save_kwargs: dict[str, Any], tags: list[str] | None = None, **upload_kwargs: Any
) -> Any:
    """``PeftModel.push_to_hub``: ``model.save_pretrained(tmp, **save_kwargs)`` into a temporary folder (adapter
    config, weights, the model card; other adapters in subfolders), ``tags`` added to the card, then
    ``upload_folder_to_hub(tmp, repo_id, **upload_kwargs)`` (the commit options: message, private, token, ...)."""
    if _offline():
        raise _unavailable("push_to_hub")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if tags:
            _add_tags(os.path.join(tmp, "README.md"), tags)
        return upload_folder_to_hub(tmp, repo_id, **upload_kwargs)


def _add_tags(card: str, tags: list[str]) -> None:
    """Append ``tags`` to the ``tags:`` list of the model card's YAML header."""
    with open(card, encoding="utf-8") as f:
        text = f.read()
    extra = "".join(f"- {t}\n" for t in tags if f"- {t}\n" not in text)
    text = text.replace("tags:\n", "tags:\n" + extra, 1) if "tags:\n" in text else text
    with open(card, "w", encoding="utf-8") as f:
        f.write(text)
