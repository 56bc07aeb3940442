"""TRL trainers with lorakit vs with PEFT: SFTTrainer step time and DPOTrainer peak memory, same model and data.

Both sides start from the same untied Llama built from a config and saved once (no download), the tokenizer of
examples/tiny_model, LoRA r=16 / alpha 32 on all linear layers, fp32 (``bf16=False``; TRL's default bf16
autocast is slow on CPUs without bf16 matmul units), TRL's other defaults (SFT: activation checkpointing on):

- SFT: ``lorakit.integrations.trl.SFTTrainer(peft_config=lorakit.LoraConfig)`` vs ``trl.SFTTrainer(peft_config=
  peft.LoraConfig)``; prompt/completion data, batch 8, max length 128, packing off; median wall time of the
  training steps after the first two, wall and process CPU time (a callback times each step; CPU time is the
  steadier figure on a machine shared with other jobs).
- DPO: ``lorakit.integrations.trl.DPOTrainer`` vs ``trl.DPOTrainer``, each given a LoRA model (TRL then uses a
  frozen ``ref`` copy of the adapter as the reference; no second model on either side); peak RSS of the process
  and its growth from just before ``train()`` (the model is loaded by then).

Each measurement runs in its own process (peak RSS only grows); the sides alternate, ``--rounds`` times.

    python bench/bench_trl.py [--rounds 2] [--sft-steps 12] [--dpo-steps 3] [--only sft|dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples" / "tiny_model"
SFT_MODEL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4}
DPO_MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 8}  # ~100 M parameters (0.4 GB fp32): a second copy would show in RSS
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def build_model(shape: dict, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def sft_worker(side: str, model_dir: str, steps: int, out: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig

    words = ["red", "green", "blue", "black", "white", "pink", "gray", "gold"]
    data = Dataset.from_dict({"prompt": [f"tell me about the color {w} " * 6 for w in words * 8],
                              "completion": [f" the color {w} is a color " * 6 for w in words * 8]})
    if side == "lorakit":
        from lorakit import LoraConfig
        from lorakit.integrations.trl import SFTTrainer
    else:
        from peft import LoraConfig
        from trl import SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

            self.cpu: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.cpu_start)

    timer = StepTimer()
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=8, max_length=128,
                     learning_rate=1e-4, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                     disable_tqdm=True, logging_steps=1000, seed=0)
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=data, peft_config=LoraConfig(**LORA),
                         callbacks=[timer])
    trainer.train()
    return {"median_step_s": statistics.median(timer.times[2:]), "median_step_cpu_s": statistics.median(timer.cpu[2:]),
            "steps": len(timer.times)}


def dpo_worker(side: str, model_dir: str, steps: int, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    if side == "lorakit":
        from lorakit import LoraConfig, get_peft_model
        from lorakit.integrations.trl import DPOTrainer
    else:
        from peft import LoraConfig, get_peft_model
        from trl import DPOTrainer
    data = Dataset.from_dict({"prompt": ["the sky is a color that people call"] * 16,
                              "chosen": [" blue, most of the time on a clear day"] * 16,
                              "rejected": [" green, which it is not, on most days"] * 16})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(**LORA))
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-4,
                     save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    before = _rss_mib()
    start = time.perf_counter()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mib": peak, "growth_mib": peak - before, "rss_before_train_mib": before,
            "train_s": time.perf_counter() - start}


def forward_backward_cpu(repeats: int = 6) -> dict[str, float]:
    """The SFT model's forward + backward (batch 8 x 128, activation checkpointing on) under lorakit and PEFT LoRA,
    alternating in one process on ONE thread; median process CPU time after the first two: the training step's
    model compute without TRL's data and optimizer work, and the steadiest figure on a shared machine."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=444, tie_word_embeddings=False, **SFT_MODEL)
    models = {}
    for name, lib in (("lorakit", lorakit), ("peft", peft)):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models[name] = lib.get_peft_model(base, lib.LoraConfig(**LORA)).train()
    ids = torch.randint(0, config.vocab_size, (8, 128))  # (B, T)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.process_time()
            model(input_ids=ids, labels=ids).loss.backward()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def run(kind: str, side: str, model_dir: Path, steps: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--side", side, "--model", str(model_dir),
           "--steps", str(steps), "--out", str(out / f"{kind}-{side}")]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=12)
    p.add_argument("--dpo-steps", type=int, default=3)
    p.add_argument("--only", choices=["sft", "dpo", "fwd-bwd"], help="run one of the measurements")
    p.add_argument("--worker", choices=["sft", "dpo"])
    p.add_argument("--side", choices=["lorakit", "peft"])
    p.add_argument("--model")
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker = sft_worker if args.worker == "sft" else dpo_worker
        print(json.dumps(worker(args.side, args.model, args.steps, args.out)))
        return
    import peft
    import torch
    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"peft {peft.__version__}; load average {os.getloadavg()[0]:.1f}")
    table = ["| | TRL + lorakit | TRL + PEFT | ratio |", "|---|---:|---:|---:|"]
    if args.only in (None, "fwd-bwd"):
        fb = forward_backward_cpu()
        table.append(f"| SFT model forward + backward, 1 thread, CPU time (s) | {fb['lorakit']:.3f} | "
                     f"{fb['peft']:.3f} | {fb['lorakit'] / fb['peft']:.2f} |")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rounds = 0 if args.only == "fwd-bwd" else args.rounds
        if rounds:
            build_model(SFT_MODEL, out / "sft_model")
            build_model(DPO_MODEL, out / "dpo_model")
        sft = {"lorakit": [], "peft": []}
        dpo = {"lorakit": [], "peft": []}
        for _ in range(rounds):
            for side in ("lorakit", "peft"):
                if args.only in (None, "sft"):
                    sft[side].append(run("sft", side, out / "sft_model", args.sft_steps, out))
                if args.only in (None, "dpo"):
                    dpo[side].append(run("dpo", side, out / "dpo_model", args.dpo_steps, out))
    for side in sft:
        print(side, "sft", sft[side], "dpo", dpo[side])
    rows = [("SFTTrainer median step time (s)", sft, "median_step_s"),
            ("SFTTrainer median step CPU time (s, process)", sft, "median_step_cpu_s"),
            ("DPOTrainer peak RSS (MiB)", dpo, "peak_rss_mib"),
            ("DPOTrainer RSS growth during train() (MiB)", dpo, "growth_mib")]
    for label, results, key in rows:
        if results["lorakit"]:  # best (lowest) of the rounds on each side
            lk, pf = (min(r[key] for r in results[s]) for s in ("lorakit", "peft"))
            table.append(f"| {label} | {lk:.3f} | {pf:.3f} | {lk / pf:.2f} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
