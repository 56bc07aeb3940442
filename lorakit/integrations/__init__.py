"""What transformers' ``Trainer`` and TRL's trainers need to recognise a lorakit model (no patching).

transformers and TRL decide how to save, reload and build a reference model with ``isinstance(model,
peft.PeftModel)`` checks (False for a lorakit model, and always False when PEFT is not installed). The thin
subclasses here answer those decisions for lorakit models and defer to the parent class for everything else:

- ``lorakit.integrations.transformers.Trainer``: adapter-only checkpoints / ``save_model`` in PEFT's layout,
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` reload the adapter.
- ``lorakit.integrations.trl.SFTTrainer`` / ``DPOTrainer``: the same, plus ``peft_config=lorakit.LoraConfig``
  applied with lorakit and, for DPO, the policy with adapters disabled as the reference model.

Importing this package imports neither transformers nor TRL; each submodule imports its own library.
"""
