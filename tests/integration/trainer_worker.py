"""One run of transformers' `Trainer` (lorakit's subclass) on a lorakit model, for tests/integration/test_trainer_ddp.py
(CPU, DDP), tests/integration/test_trainer_fsdp.py (CPU, accelerate's FSDP2 over gloo) and
tests/gpu/test_trainer_fsdp.py (GPUs, accelerate's FSDP2):

    python trainer_worker.py MODEL_DIR OUT PER_DEVICE_BATCH                          # one process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 trainer_worker.py ...        # DDP on CPU (gloo)
    torchrun --nproc_per_node 2 trainer_worker.py ... --cpu-fsdp2                    # FSDP2 on CPU (gloo)
    accelerate launch --config_file FSDP2.yaml trainer_worker.py ...                 # FSDP2 on GPUs

Options: ``--steps N`` (default 3), ``--save-steps K`` (checkpoints every K steps), ``--resume CHECKPOINT``,
``--nf4`` (a 4-bit NF4 base, packed bytes stored as bf16, as FSDP-QLoRA needs), ``--trl-sft`` (TRL's
``SFTTrainer``, lorakit's subclass, instead of transformers' ``Trainer``).

Fixed-length random sequences (every row has the same number of label tokens, so a mean over 2 ranks of 2 rows is
the mean over 4 rows), dropout 0, TF32 off: the multi-process and one-process runs do the same arithmetic up to
order. The final adapter is written by ``trainer.save_model`` (under FSDP: lorakit's Trainer gathers the adapter
only, whatever the plugin's state dict type). Rank 0 writes ``engine.txt``: which wrapper trained the model.
"""

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, TrainingArguments

from lorakit import BitsAndBytesConfig, LoraConfig, get_peft_model, quantize_model
from lorakit.integrations.transformers import Trainer


def cpu_fsdp2_accelerator() -> None:
    """Configure accelerate for FSDP2 on CPU processes (gloo), for a Trainer built with
    ``accelerator_config={"use_configured_state": True}`` (transformers' option to use the state set up before it).

    accelerate 1.16 turns FSDP on only when its state says the processes drive accelerators (`state.py`: the FSDP
    switch sits under MULTI_GPU / MULTI_XPU / ...; MULTI_CPU has none), although ``fully_shard`` itself runs on CPU
    over gloo. So this sets the one field accelerate has no public option for, the distributed type, before the
    `Accelerator` reads it; everything after -- accelerate's `fsdp2_prepare_model`, its sharded checkpoints, the
    Trainer's FSDP branches -- is the real code that runs on GPUs. The device stays the CPU."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = PartialState(cpu=True)  # the gloo process group, from torchrun's environment
    assert state.distributed_type == DistributedType.MULTI_CPU and state.num_processes > 1, state
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True, cpu_ram_efficient_loading=False)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    assert accelerator.is_fsdp2 and accelerator.device.type == "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("per_device", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--cpu-fsdp2", action="store_true")
    parser.add_argument("--nf4", action="store_true")
    parser.add_argument("--trl-sft", action="store_true")
    opts = parser.parse_args(argv)
    if opts.cpu_fsdp2:
        cpu_fsdp2_accelerator()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(opts.model_dir, dtype=torch.float32)
    if opts.nf4:
        quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32,
                                                 bnb_4bit_quant_storage=torch.bfloat16))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                             init_lora_weights=False))
    ids = torch.randint(3, 400, (16, 24), generator=torch.Generator().manual_seed(1))  # (rows, tokens)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    settings = dict(
        per_device_train_batch_size=opts.per_device, max_steps=opts.steps, learning_rate=1e-2, logging_steps=1,
        save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500, report_to="none",
        seed=0, dataloader_drop_last=True,
        accelerator_config={"use_configured_state": True} if opts.cpu_fsdp2 else None)
    if opts.trl_sft:  # TRL's SFTTrainer (lorakit's subclass) on the same tokenized rows: loss on every token
        from trl import SFTConfig

        from lorakit.integrations.trl import SFTTrainer

        data = data.remove_columns("labels")
        config = SFTConfig(opts.out, bf16=False, max_length=None, packing=False, **settings)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data)
    else:
        args = TrainingArguments(opts.out, remove_unused_columns=False, **settings)
        trainer = Trainer(model=model, args=args, train_dataset=data)
    if trainer.args.process_index == 0 and opts.resume is None:
        model.save_pretrained(f"{opts.out}/adapter-start")  # before training (B non-zero: init_lora_weights=False)
    trainer.train(resume_from_checkpoint=opts.resume)
    if trainer.args.process_index == 0:  # which engine wrapped the model, for the tests to assert on
        wrapped = trainer.model_wrapped
        engine = "fsdp2" if isinstance(wrapped, FSDPModule) else type(wrapped).__name__
        Path(opts.out, "engine.txt").write_text(f"{engine} world_size={trainer.args.world_size}")
    trainer.save_model(f"{opts.out}/adapter")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: a rank exiting with it alive can abort


if __name__ == "__main__":
    main()
