"""``PeftModel.push_to_hub`` and ``lorakit push``, captured at the ``huggingface_hub.HfApi`` boundary (no network
in tests): what would be uploaded, with which arguments, compared with PEFT's ``push_to_hub``; the offline error.
"""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError

from lorakit.cli.main import main
from lorakit.io.hub import HubUnavailableError

from ._helpers import LIBS, lib, tiny_base


class HubRecorder:
    """Replaces the HfApi calls an upload makes; records their arguments and the uploaded files."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.repos: list[dict] = []
        self.branches: list[dict] = []
        self.commits: list[dict] = []
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", self._create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", self._create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", self._create_commit)

        def no_card_yet(*args, **kwargs):  # transformers (PEFT's push) looks for an existing card on the Hub
            raise EntryNotFoundError("no README.md in the repo yet")

        monkeypatch.setattr(huggingface_hub.ModelCard, "load", no_card_yet)

    def _create_repo(self, repo_id, **kw):
        self.repos.append({"repo_id": repo_id, **kw})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def _create_branch(self, repo_id, **kw):
        self.branches.append({"repo_id": repo_id, **kw})

    def _create_commit(self, repo_id, operations, **kw):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            with open(src, "rb") as f:  # read now: the temporary folder is gone after the call
                files[op.path_in_repo] = f.read()
        self.commits.append({"repo_id": repo_id, "files": files, **kw})
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="",
                                          commit_description="", oid="1", pr_url=None)


def _model(name: str, second: bool = False):
    m = lib(name)
    model = m.get_peft_model(tiny_base(tied=False), m.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    if second:
        model.add_adapter("other", m.LoraConfig(r=2, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    return model


@pytest.mark.parametrize("second", [False, True], ids=["one_adapter", "two_adapters"])
def test_push_to_hub_uploads_the_adapter_folder_as_peft(second: bool, monkeypatch) -> None:
    kwargs = dict(private=True, token="hf_test", commit_message="my adapter", revision="v1", create_pr=False,
                  commit_description="trained on CPU")
    seen = {}
    for name in LIBS:
        hub = HubRecorder(monkeypatch)
        _model(name, second).push_to_hub("user/my-lora-adapter", **kwargs)
        (repo,), (branch,), (commit,) = hub.repos, hub.branches, hub.commits
        seen[name] = hub
        assert repo["repo_id"] == "user/my-lora-adapter" and repo["private"] is True and repo["token"] == "hf_test"
        assert branch["branch"] == "v1"
        assert {k: commit[k] for k in ("commit_message", "commit_description", "revision", "create_pr", "token")} == {
            "commit_message": "my adapter", "commit_description": "trained on CPU", "revision": "v1",
            "create_pr": False, "token": "hf_test"}
    lk, pf = seen["lorakit"].commits[0]["files"], seen["peft"].commits[0]["files"]
    assert sorted(lk) == sorted(pf)  # adapter_config.json, adapter_model.safetensors, README.md (+ other/...)
    assert "model.safetensors" not in lk and "config.json" not in lk
    assert json.loads(lk["adapter_config.json"])["r"] == 4


def test_merged_model_push_to_hub_publishes_the_full_model(monkeypatch) -> None:
    hub = HubRecorder(monkeypatch)
    merged = _model("lorakit").merge_and_unload()
    merged.push_to_hub("user/merged", private=False)
    files = hub.commits[0]["files"]
    assert {"config.json", "model.safetensors"} <= set(files) and "adapter_config.json" not in files
    assert b"lora" not in files["model.safetensors"][:4096]  # plain transformers keys in the header


def test_offline_push_names_the_hub_and_the_setting(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = _model("lorakit")
    with pytest.raises(HubUnavailableError, match=r"Hugging Face Hub.*HF_HUB_OFFLINE"):
        model.push_to_hub("user/my-lora-adapter")
    model.save_pretrained(tmp_path)
    assert main(["push", str(tmp_path), "user/my-lora-adapter"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "HF_HUB_OFFLINE" in err and err.count("\n") == 1


def test_unreachable_hub_is_one_clear_error(monkeypatch, tmp_path, capsys) -> None:
    """The real HTTP client against a closed local port (connection refused at once), as without a network."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    model = _model("lorakit")
    with pytest.raises(HubUnavailableError, match="could not reach the Hugging Face Hub"):
        model.push_to_hub("user/my-lora-adapter", token="hf_test")
    model.save_pretrained(tmp_path)
    assert main(["push", str(tmp_path), "user/my-lora-adapter"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "127.0.0.1:9" in err and err.count("\n") == 1


def test_cli_push_uploads_a_saved_folder(monkeypatch, tmp_path, capsys) -> None:
    hub = HubRecorder(monkeypatch)
    _model("lorakit").save_pretrained(tmp_path)
    assert main(["push", str(tmp_path), "user/a", "--private", "--revision", "dev"]) == 0
    assert sorted(hub.commits[0]["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.repos[0]["private"] is True and hub.branches[0]["branch"] == "dev"
    assert "huggingface.co/user/a" in capsys.readouterr().out
