"""transformers' ``Trainer`` for lorakit models: adapter-only checkpoints in PEFT's layout.

Use ``from lorakit.integrations.transformers import Trainer`` in place of ``from transformers import Trainer``;
with any other model it is transformers' ``Trainer`` unchanged.

Why a subclass (transformers 5.x, ``transformers/trainer.py``):

- ``Trainer._save`` calls ``model.save_pretrained`` only for ``isinstance(model, (PreTrainedModel,
  peft.PeftModel))``; any other model has its full ``state_dict()`` written to ``model.safetensors``, which fails
  on tied embeddings ("Some tensors share memory") and otherwise stores the whole model under lorakit's
  in-memory names.
- ``Trainer._load_from_checkpoint`` and ``Trainer._load_best_model`` reload an adapter folder only when
  ``_is_peft_model(model)`` (``isinstance(model, peft.PeftModel)``, False whenever PEFT is not installed).

The three methods are overridden for lorakit models only, and do what transformers does for PEFT models: save
``adapter_config.json`` + ``adapter_model.safetensors`` (+ the tokenizer and ``training_args.bin``; the Trainer
adds its optimizer / scheduler / RNG / state files) and reload with ``PeftModel.load_adapter``.

Under accelerate's FSDP (``Trainer.is_fsdp_enabled``): a 4-bit base's layers are put in the form FSDP shards
(``Linear4bit.expose_quant_state``) when the Trainer builds its accelerator; ``save_model`` all-gathers the
adapter's tensors only (the base is never gathered whole, whatever ``fsdp_state_dict_type`` is: transformers' own
``save_model`` writes nothing under ``SHARDED_STATE_DICT`` and gathers the whole model under ``FULL_STATE_DICT``)
and rank 0 writes PEFT's layout. Checkpoints hold that adapter, the shards of the trainable tensors
(``pytorch_model_fsdp_0/``, ``torch.distributed.checkpoint``; the frozen base is not written, as accelerate does for
PEFT models) and accelerate's optimizer shards (``optimizer_0/``); resuming and ``load_best_model_at_end`` read
them back.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import nn

from lorakit.config import CONFIG_NAME
from lorakit.io.adapter import WEIGHTS_NAME, WEIGHTS_NAME_BIN
from lorakit.model import PeftModel

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME
SCHEDULER_NAME = "scheduler.pt"  # transformers.trainer.SCHEDULER_NAME
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate's FSDP_MODEL_NAME + "_0": what transformers' resume looks for

__all__ = ["LorakitTrainerMixin", "Trainer", "is_lorakit_model"]


def is_lorakit_model(model: Any) -> bool:
    """True for a lorakit ``PeftModel`` (any task class)."""
    return isinstance(model, PeftModel)


def _has_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_NAME)) and (
        os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) or os.path.isfile(os.path.join(folder, WEIGHTS_NAME_BIN))
    )


def load_adapter_checkpoint(model: PeftModel, folder: str) -> None:
    """Reload the adapters a checkpoint holds into ``model``, as transformers does for PEFT models on resume.

    The root folder is the ``default`` adapter when other adapters sit in subfolders, else the active adapter;
    only the active adapter is made trainable; the active adapter stays active. Tensors keep their identity, so
    an optimizer built on them goes on."""
    subdirs = sorted(name for name in os.listdir(folder) if _has_adapter(os.path.join(folder, name)))
    if not _has_adapter(folder) and not subdirs:
        raise ValueError(
            f"Can't find a lorakit/PEFT adapter checkpoint at {folder}: it has no {CONFIG_NAME} with "
            f"{WEIGHTS_NAME}; pass a checkpoint folder written by this Trainer."
        )
    active = model.active_adapter
    if not subdirs:
        model.load_adapter(folder, active, is_trainable=True)
        return
    if _has_adapter(folder):
        model.load_adapter(folder, "default", is_trainable=active == "default")
    for name in subdirs:
        model.load_adapter(os.path.join(folder, name), name, is_trainable=name == active)
    model.set_adapter(active)


class LorakitTrainerMixin:
    """``_save`` / ``_load_from_checkpoint`` / ``_load_best_model`` for a lorakit ``self.model``, and under FSDP
    ``save_model`` / ``_save_optimizer_and_scheduler`` / ``create_accelerator_and_postprocess`` (module docstring);
    put it first in the bases of a ``transformers.Trainer`` subclass. Other models go to the parent's methods."""

    model: nn.Module
    args: Any
    state: Any
    processing_class: Any
    accelerator: Any

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        if self._fsdp():  # lorakit 4-bit layers: their scales shard with the packed weight (idempotent)
            for module in self.model.modules():
                if hasattr(module, "expose_quant_state"):
                    module.expose_quant_state()

    def _lorakit_model(self, model: nn.Module | None = None) -> PeftModel | None:
        model = self.model if model is None else self.accelerator.unwrap_model(model)
        return model if is_lorakit_model(model) else None

    def _fsdp(self) -> bool:
        return bool(getattr(self, "is_fsdp_enabled", False))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self._lorakit_model()
        if model is None or not self._fsdp():
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        from lorakit.train.distributed import gather_adapter_state

        self._save(output_dir, state_dict=gather_adapter_state(model))  # every process gathers; rank 0 writes
        if self.args.push_to_hub and not _internal_call:  # as transformers' save_model
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)  # type: ignore[attr-defined]

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model = self._lorakit_model()
        if model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict)  # None: the model's own tensors
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._lorakit_model() is None or not self._fsdp():
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        # FSDP: the trainable tensors' shards only (accelerate's sharded save of a non-PEFT model holds the whole
        # base in every checkpoint), then accelerate's optimizer shards and the scheduler, as transformers does
        from accelerate.utils import save_fsdp_optimizer

        from lorakit.train.distributed import save_trainable_state

        save_trainable_state(self.model, os.path.join(output_dir, FSDP_MODEL_DIR))
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))  # type: ignore

    def _load_sharded(self, model: nn.Module, folder: str) -> None:
        from lorakit.train.distributed import load_trainable_state

        if not os.path.isdir(os.path.join(folder, FSDP_MODEL_DIR)):
            raise ValueError(f"{folder} has no {FSDP_MODEL_DIR}/ (it was not written by a Trainer under FSDP): "
                             "resume it without FSDP, or start a new run with its adapter "
                             "(PeftModel.from_pretrained(base, folder, is_trainable=True))")
        load_trainable_state(model, os.path.join(folder, FSDP_MODEL_DIR))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        peft_model = self._lorakit_model(model)
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        if self._fsdp():
            return self._load_sharded(model if model is not None else self.model, resume_from_checkpoint)
        load_adapter_checkpoint(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self._lorakit_model()
        if model is None:
            return super()._load_best_model()  # type: ignore[misc]
        best = self.state.best_model_checkpoint
        if self._fsdp():
            return self._load_sharded(self.model, best)
        if not _has_adapter(best):
            raise ValueError(f"load_best_model_at_end: {best} has no adapter ({CONFIG_NAME} + {WEIGHTS_NAME}).")
        model.load_adapter(best, model.active_adapter)  # requires_grad left as it was (PEFT and transformers)


class Trainer(LorakitTrainerMixin, transformers.Trainer):
    """transformers' ``Trainer``; with a lorakit ``PeftModel`` it saves and reloads adapter-only checkpoints in
    PEFT's layout (see the module docstring for the transformers checks that make this subclass necessary)."""
