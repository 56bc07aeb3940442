"""`lorakit train` vs TRL SFTTrainer + PEFT: tokens/s and peak memory, same model, data and settings.

Both sides train the shipped tiny model (examples/tiny_model) with LoRA r=16 on all linear layers for one
epoch over the first N prompt/completion examples (loss on completions only), batch 16, max length 64,
AdamW lr 1e-3 with a linear schedule, fp32, no evaluation, no checkpoints. Each side runs in its own
process; we report its non-padding tokens per second of training time and its peak RSS.

    python bench/bench_train.py [--examples 320] [--threads 2]

Needs `trl` (pip install --no-deps trl; it uses the installed torch/transformers/peft).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "tiny_model"
DATA = REPO / "examples" / "data" / "second_word_prompt_completion_train.jsonl"
SETTINGS = {"r": 16, "alpha": 32, "batch": 16, "max_length": 64, "lr": 1e-3}


def run_lorakit(n: int, out: Path) -> dict:
    cfg = {"model": str(MODEL),
           "lora": {"r": SETTINGS["r"], "lora_alpha": SETTINGS["alpha"], "target_modules": "all-linear"},
           "data": {"path": str(DATA), "max_examples": n},
           "training": {"output_dir": str(out / "lorakit"), "num_train_epochs": 1,
                        "per_device_train_batch_size": SETTINGS["batch"], "learning_rate": SETTINGS["lr"],
                        "max_seq_length": SETTINGS["max_length"], "logging_steps": 5, "disable_tqdm": True,
                        "report_to": "none"}}
    path = out / "lorakit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "lorakit.cli.main", "train", str(path)], check=True,
                   capture_output=True)
    s = json.loads((out / "lorakit" / "summary.json").read_text())
    return {"tokens_per_s": s["tokens_per_s"], "peak_rss_mib": s["peak_memory_bytes"] / 2**20,
            "train_time_s": s["train_time_s"], "final_loss": s["final_train_loss"]}


def trl_worker(n: int, out: str) -> None:
    """Runs in its own process: TRL SFTTrainer + PEFT LoraConfig, prints one JSON line."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    ds = load_dataset("json", data_files=str(DATA), split="train").select(range(n))
    args = SFTConfig(output_dir=out, num_train_epochs=1, per_device_train_batch_size=SETTINGS["batch"],
                     learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", max_length=SETTINGS["max_length"],
                     logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                     completion_only_loss=True, packing=False, dataloader_num_workers=0, seed=42)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
    start = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": tokens / elapsed, "train_time_s": elapsed,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "final_loss": result.training_loss}))


def run_trl(n: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", "trl", "--examples", str(n), "--out", str(out)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate_check(ckpt: bool) -> None:
    """`lorakit estimate` vs measured peak RSS growth of LoRA training steps on CPU (fp32, eager)."""
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_peft_model
    from lorakit.train.estimate import estimate_memory
    from lorakit.train.sft import CausalLMLoss

    seq, batch = 256, 8
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq)
    for _ in range(1):  # one setting per process: ru_maxrss only grows
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
        loss_fn = CausalLMLoss(model, chunked=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for _ in range(2):
            loss_fn(ids, ids, torch.ones_like(ids), torch.arange(seq).expand(batch, -1)).backward()
            opt.step()
            opt.zero_grad()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        est = estimate_memory(model.get_base_model(), "lora", seq, batch, r=16, dtype="float32")
        predicted = est.total(ckpt) - est.weights
        print(f"checkpointing={ckpt}: predicted {predicted / 2**20:.1f} MiB (adapters+grads+optimizer+"
              f"activations+loss), measured peak RSS growth {grown / 2**20:.1f} MiB, "
              f"error {100 * (predicted - grown) / grown:+.0f}%")
        del model, loss_fn, opt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--worker", choices=["trl"])
    p.add_argument("--out")
    p.add_argument("--estimate-check", action="store_true", help="check `lorakit estimate` against peak RSS")
    p.add_argument("--checkpointing", type=int, default=-1)
    args = p.parse_args()
    if args.estimate_check and args.checkpointing >= 0:
        estimate_check(bool(args.checkpointing))
        return
    if args.estimate_check:
        for ckpt in (0, 1):
            proc = subprocess.run([sys.executable, __file__, "--estimate-check", "--checkpointing", str(ckpt)],
                                  check=True, capture_output=True, text=True)
            print(proc.stdout.strip().splitlines()[-1])
        return
    if args.worker:
        trl_worker(args.examples, args.out)
        return
    import peft
    import torch
    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"trl {trl.__version__}; {os.cpu_count()} CPU cores; {args.examples} examples, settings {SETTINGS}")
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_lorakit(args.examples, Path(tmp))
        ref = run_trl(args.examples, Path(tmp) / "trl")
    print(f"{'':<22} {'lorakit train':>14} {'TRL SFTTrainer':>15} {'ratio':>7}")
    for key, label in (("tokens_per_s", "tokens/s"), ("peak_rss_mib", "peak RSS (MiB)"),
                       ("train_time_s", "train time (s)"), ("final_loss", "final train loss")):
        print(f"{label:<22} {ours[key]:>14.2f} {ref[key]:>15.2f} {ours[key] / ref[key]:>7.2f}")


if __name__ == "__main__":
    main()
