"""`lorakit push`: upload a saved adapter (or merged model) folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

import argparse
import os


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder written by save_pretrained / lorakit train / lorakit merge")
    p.add_argument("repo_id", help="Hub repo, e.g. user/my-lora-adapter (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)


def run_push(args: argparse.Namespace) -> int:
    from lorakit.io.hub import upload_folder_to_hub

    folder = args.folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; give the folder save_pretrained wrote")
    known = ("adapter_config.json", "config.json")
    if not any(os.path.isfile(os.path.join(folder, f)) for f in known):
        raise ValueError(f"{folder} has neither adapter_config.json (an adapter) nor config.json (a model); "
                         "give the folder save_pretrained wrote")
    info = upload_folder_to_hub(folder, args.repo_id, private=args.private or None, revision=args.revision,
                                create_pr=args.create_pr, commit_message=args.commit_message, what="lorakit push")
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)
    return 0
