"""`lorakit train` (method: dpo) vs TRL DPOTrainer + PEFT: step time and peak memory, same model, data, settings.

Model: a seeded LlamaForCausalLM made here (hidden 512, 4 layers, 8 heads, MLP 1376, vocab 32,000 untied, fp32;
the tokenizer of examples/tiny_model), saved to a temporary folder. Data: synthetic pairs, a prompt of ~200
tokens (``repeat:`` + 100 words) and chosen / rejected completions of 12 words each. Both sides: LoRA r=16,
alpha 32 on all linear layers, DPO sigmoid loss with beta 0.1, reference = the adapter-disabled model at every
step (no precomputation), batch 8 pairs, AdamW lr 5e-4 constant, fp32, no evaluation, no checkpoints, the same
number of steps. Each side runs in its own process (so peak RSS is its own); the two alternate for --rounds
rounds and the best round of each is reported.

    python bench/bench_dpo.py [--steps 6] [--rounds 2] [--threads 2]

Needs `trl` (pip install --no-deps trl; it uses the installed torch/transformers/peft).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples" / "tiny_model"
WORDS = ("cat dog bird fish horse mouse fox bear wolf frog duck goat lion owl tiger rabbit tree river stone house "
         "boat cloud apple bread red blue green small big old young happy quiet brave dark bright").split()
SETTINGS = {"r": 16, "alpha": 32, "batch": 8, "lr": 5e-4, "beta": 0.1, "max_length": 512}


def make_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_pairs(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "repeat: " + " ".join(rng.choices(WORDS, k=100)) + "\nanswer:",
                                "chosen": " " + " ".join(rng.choices(WORDS, k=12)),
                                "rejected": " " + " ".join(rng.choices(WORDS, k=12))}) + "\n")
    return path


def run_lorakit(model: Path, data: Path, steps: int, out: Path) -> dict:
    cfg = {"method": "dpo", "preference": {"beta": SETTINGS["beta"]},
           "model": {"name_or_path": str(model)},
           "lora": {"r": SETTINGS["r"], "lora_alpha": SETTINGS["alpha"], "lora_dropout": 0.0,
                    "target_modules": "all-linear"},
           "data": {"path": str(data)},
           "training": {"output_dir": str(out / "lorakit"), "overwrite_output_dir": True, "max_steps": steps,
                        "per_device_train_batch_size": SETTINGS["batch"], "learning_rate": SETTINGS["lr"],
                        "lr_scheduler_type": "constant", "max_seq_length": SETTINGS["max_length"],
                        "logging_steps": 1, "disable_tqdm": True, "report_to": "none"}}
    path = out / "lorakit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "lorakit.cli.main", "train", str(path)], check=True, capture_output=True)
    s = json.loads((out / "lorakit" / "summary.json").read_text())
    losses = [r["train_loss"] for r in map(json.loads, (out / "lorakit" / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in r]
    return {"step_s": s["train_time_s"] / steps, "peak_rss_mib": s["peak_memory_bytes"] / 2**20,
            "mean_loss": sum(losses) / len(losses)}


def trl_worker(model_dir: str, data: str, steps: int, out: str) -> None:
    """Runs in its own process: TRL DPOTrainer + PEFT LoraConfig; prints one JSON line."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):  # the training loop's time, as lorakit's train_time_s
        def on_train_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            self.elapsed = time.perf_counter() - self.start

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=data, split="train")
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=SETTINGS["batch"],
                     learning_rate=SETTINGS["lr"], lr_scheduler_type="constant", beta=SETTINGS["beta"],
                     max_length=SETTINGS["max_length"], logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=42)
    clock = Clock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[clock],
                         peft_config=LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    result = trainer.train()
    print(json.dumps({"step_s": clock.elapsed / steps, "mean_loss": result.training_loss,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_trl(model: Path, data: Path, steps: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", "trl", "--model", str(model), "--data", str(data),
                           "--steps", str(steps), "--out", str(out / "trl")], check=True, capture_output=True,
                          text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=["trl"])
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        trl_worker(args.model, args.data, args.steps, args.out)
        return
    import peft
    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        data = make_pairs(tmp / "pairs.jsonl", args.steps * SETTINGS["batch"])
        runs: dict[str, list[dict]] = {"lorakit": [], "trl": []}
        for _ in range(args.rounds):
            runs["lorakit"].append(run_lorakit(model, data, args.steps, tmp))
            runs["trl"].append(run_trl(model, data, args.steps, tmp))
    best = {side: {"step_s": min(r["step_s"] for r in rs), "peak_rss_mib": min(r["peak_rss_mib"] for r in rs),
                   } for side, rs in runs.items()}
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"trl {trl.__version__}; {args.steps} steps x {SETTINGS['batch']} pairs, {args.rounds} rounds")
    for side, rs in runs.items():
        steps = ", ".join(f"{r['step_s']:.2f}" for r in rs)
        rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in rs)
        loss = ", ".join(f"{r['mean_loss']:.4f}" for r in rs)
        print(f"{side:>8}: step {steps} s; peak RSS {rss} MiB; mean train loss {loss}")
    print(f"lorakit / TRL: step time {best['lorakit']['step_s'] / best['trl']['step_s']:.2f}x, "
          f"peak RSS {best['lorakit']['peak_rss_mib'] / best['trl']['peak_rss_mib']:.2f}x (best round of each)")


if __name__ == "__main__":
    main()
