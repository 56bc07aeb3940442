"""One run of transformers' `Trainer` (lorakit's subclass) on a lorakit model, for tests/integration/test_trainer_ddp.py
(CPU, DDP) and tests/gpu/test_trainer_fsdp.py (GPUs, accelerate's FSDP2):

    python trainer_worker.py MODEL_DIR OUT PER_DEVICE_BATCH                          # one process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 trainer_worker.py ...        # DDP on CPU (gloo)
    accelerate launch --config_file FSDP2.yaml trainer_worker.py ...                 # FSDP2 on GPUs

Fixed-length random sequences (every row has the same number of label tokens, so a mean over 2 ranks of 2 rows is
the mean over 4 rows), dropout 0, TF32 off: the multi-process and one-process runs do the same arithmetic up to
order. Under FSDP the adapter is saved from a full (gathered) state dict, as transformers' docs advise for PEFT.
"""

import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from lorakit import LoraConfig, get_peft_model
from lorakit.integrations.transformers import Trainer


def main(model_dir: str, out: str, per_device: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                             init_lora_weights=False))
    ids = torch.randint(3, 400, (16, 24), generator=torch.Generator().manual_seed(1))  # (rows, tokens)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(out, per_device_train_batch_size=per_device, max_steps=3, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to="none", seed=0,
                             dataloader_drop_last=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    if trainer.args.process_index == 0:
        model.save_pretrained(f"{out}/adapter-start")  # before training (B non-zero: init_lora_weights=False)
    trainer.train()
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(f"{out}/adapter")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
