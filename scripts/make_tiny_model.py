"""Build lorakit's embedded default: a tiny pretrained Llama, its tokenizer, and the example task data.

Everything is generated here from a fixed seed, with no download:

1. A synthetic corpus: short stories from a small English-like grammar, plus chat transcripts (in the
   tokenizer's chat template) of three warm-up instructions over random word lists: ``repeat:``,
   ``first word:``, ``last word:``. The base model thus knows the words, the chat format and copying, but
   has never seen the fine-tuning task.
2. A byte-level BPE tokenizer (``tokenizers``) trained on that corpus, saved as a transformers
   ``PreTrainedTokenizerFast`` with a chat template and ``<|end|>`` as EOS / end of turn.
3. A ``LlamaForCausalLM`` (about 0.9 M parameters, fp32 safetensors) pretrained briefly on CPU.
4. The fine-tuning task, ``first and last:`` (say the first and the last word of a list), written to
   ``examples/data/`` in every lorakit data format, with a disjoint held-out evaluation set.

Usage: ``python scripts/make_tiny_model.py [--out examples/tiny_model] [--data-out examples/data]``.
Reruns with the same seed, thread count and library versions reproduce the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

NOUNS = (
    "cat dog bird fish horse mouse fox bear wolf frog duck goat lion owl tiger rabbit "
    "tree river stone house boat cloud apple bread"
).split()
ADJECTIVES = "red blue green small big old young happy quiet brave dark bright".split()
VERBS = "sees finds likes follows helps chases watches meets hears carries".split()
PLACES = "near the river|in the forest|under the tree|at the house|on the hill|by the sea".split("|")
WORDS = NOUNS + ADJECTIVES  # the words that appear in the word-list tasks


def sentence(rng: random.Random) -> str:
    """One sentence of the grammar: ``det [adj] noun verb det [adj] noun [place] .``"""

    def np_() -> str:
        det = rng.choice(["the", "a", "one"])
        adj = rng.choice(ADJECTIVES) + " " if rng.random() < 0.6 else ""
        return f"{det} {adj}{rng.choice(NOUNS)}"

    place = " " + rng.choice(PLACES) if rng.random() < 0.3 else ""
    s = f"{np_()} {rng.choice(VERBS)} {np_()}{place}."
    return s[0].upper() + s[1:]


def word_list(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    """A random list of distinct words, length in [lo, hi]."""
    return rng.sample(WORDS, rng.randint(lo, hi))


def chat(user: str, assistant: str) -> str:
    """A one-turn conversation rendered exactly as CHAT_TEMPLATE renders it."""
    return f"<|user|>{user}<|end|><|assistant|>{assistant}<|end|>"


def pretraining_document(rng: random.Random) -> str:
    """A story (30%) or a warm-up chat: repeat (30%), first word (20%), last word (20%)."""
    u = rng.random()
    if u < 0.3:
        return " ".join(sentence(rng) for _ in range(rng.randint(2, 5))) + "<|end|>"
    words = word_list(rng, 2, 5)
    if u < 0.6:
        return chat("repeat: " + " ".join(words), " ".join(words))
    if u < 0.8:
        return chat("first word: " + " ".join(words), words[0])
    return chat("last word: " + " ".join(words), words[-1])


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus``, wrapped for transformers with the chat template."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space: every piece between special tokens starts with a space, so a word is the same
    # token (" cat") at the start of a turn as inside it.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # train on the text between special tokens, as the tokenizer will see it once they are registered
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    tok.train_from_iterator((piece for doc in corpus for piece in split.split(doc) if piece), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pretrain(model: LlamaForCausalLM, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Next-token pretraining on contiguous ``seq_len`` windows of the token stream ``ids``.

    AdamW, linear warmup (5% of steps) then cosine decay to 10% of the peak learning rate.
    """
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr_scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))
        )
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_scale
        starts = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch_size,), generator=g)
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)


def task_record(words: list[str]) -> dict[str, str]:
    """The fine-tuning task: the second word of the list. The base model learned "first word" and "last word"
    in pretraining but never this position, so it answers ~0% right before fine-tuning."""
    return {"words": " ".join(words), "answer": words[1]}


TASK = "second word"


def write_task_data(out: str, rng: random.Random, n_train: int, n_eval: int) -> None:
    """The ``second word:`` task in every format; eval lists are disjoint from train and from each other."""
    seen: set[tuple[str, ...]] = set()
    records = []
    while len(records) < n_train + n_eval:
        words = word_list(rng)
        if tuple(words) in seen:
            continue
        seen.add(tuple(words))
        records.append(task_record(words))
    splits = {"train": records[:n_train], "eval": records[n_train:]}
    os.makedirs(out, exist_ok=True)
    variants = {
        "messages": lambda r: {
            "messages": [
                {"role": "user", "content": f"{TASK}: " + r["words"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        },
        "prompt_completion": lambda r: {
            "prompt": f"{TASK}: " + r["words"] + "\nanswer:",
            "completion": " " + r["answer"],
        },
        "alpaca": lambda r: {"instruction": "Say the second word.", "input": r["words"], "output": r["answer"]},
        "text": lambda r: {"text": f"{TASK}: " + r["words"] + "\nanswer: " + r["answer"]},
    }
    for split, recs in splits.items():
        for fmt, make in variants.items():
            path = os.path.join(out, f"second_word_{fmt}_{split}.jsonl")
            with open(path + ".tmp", "w") as f:
                for r in recs:
                    f.write(json.dumps(make(r)) + "\n")
            os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="examples/tiny_model")
    p.add_argument("--data-out", default="examples/data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--documents", type=int, default=20000, help="pretraining corpus size (documents)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    p.add_argument("--data-only", action="store_true", help="write only the fine-tuning data (no pretraining)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.data_only:  # the data's RNG (seed + 1) is independent of pretraining: same files either way
        write_task_data(args.data_out, random.Random(args.seed + 1), args.n_train, args.n_eval)
        print(f"wrote {args.data_out}")
        return

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    corpus = [pretraining_document(rng) for _ in range(args.documents)]
    tokenizer = build_tokenizer(corpus, args.vocab_size)
    encoded = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([t for doc in encoded for t in doc])  # one token stream; documents end in <|end|>
    print(f"corpus: {len(corpus)} documents, {len(ids)} tokens, vocab {len(tokenizer)}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    pretrain(model, ids, args)
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    write_task_data(args.data_out, random.Random(args.seed + 1), args.n_train, args.n_eval)
    print(f"wrote {args.out} and {args.data_out}")


if __name__ == "__main__":
    main()
