"""`lorakit serve` throughput on CPU: 32 concurrent requests over 8 adapters, 64 new tokens each, side by side with

    (a) the same 32 requests all on one adapter, through the same server       (target: mixed >= 0.8x of this)
    (b) one request at a time, ``set_adapter`` then ``generate`` (lorakit)     (target: serve >= 4x this)
    (c) the 32 requests as one static PEFT ``generate(adapter_names=...)``     (target: serve >= 1.0x this)

and the engine alone (the same 32 requests through ``Engine.step`` in this process, no HTTP), to show what HTTP costs.

Model: a random Llama (hidden 256, intermediate 688, 4 layers, 4 heads, the tokenizer of examples/tiny_model), 8
adapters r=16 on q/v/o/down with B != 0 (bench_variants' setting); prompts of 16-48 random token ids; greedy; every
request decodes exactly 64 tokens (``ignore_eos``; the baselines' model has no EOS). The server is a real
`lorakit serve` process on 127.0.0.1, driven by 32 client threads (httpx). One torch thread everywhere
(``OMP_NUM_THREADS=1``). Modes take turns for ``--rounds`` rounds; tokens/s and ratios are medians over rounds
(ratios per round). Latency is each request's wall time from its send (all sent at once) to its last byte.

    python bench/bench_serve.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_REQ, N_ADAPTERS, NEW = 32, 8, 64
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def build(folder: Path) -> tuple[Path, list[str], list[list[int]]]:
    """The random base (saved with the tiny tokenizer), 8 adapters, 32 prompts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import lorakit

    tok = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, eos_token_id=None,
                      bos_token_id=None, pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(cfg)
    base.generation_config.eos_token_id = None
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    names = [f"ad{i}" for i in range(N_ADAPTERS)]
    for i, name in enumerate(names):
        torch.manual_seed(i + 1)
        config = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        lorakit.get_peft_model(LlamaForCausalLM.from_pretrained(folder / "base"), config).save_pretrained(folder / name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, len(tok), (int(torch.randint(16, 49, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_REQ)]
    return folder, names, prompts


def start_server(folder: Path, names: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit.cli.main", "serve", "--base", str(folder / "base"), "--port", str(port),
           "--max-batch-size", str(N_REQ)]
    for n in names:
        cmd += ["--adapter", f"{n}={folder / n}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 3 minutes")


def over_http(url: str, rows: list[str], prompts: list[list[int]]) -> tuple[float, list[float], int]:
    """(wall s, per-request latencies, tokens) of all requests sent at once."""
    import httpx

    client = httpx.Client(limits=httpx.Limits(max_connections=N_REQ), timeout=600)
    start = threading.Barrier(N_REQ + 1)

    def one(i: int) -> tuple[float, int]:
        body = {"model": rows[i], "prompt": prompts[i], "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
        start.wait()
        t = time.perf_counter()
        r = client.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(N_REQ) as pool:
        futures = [pool.submit(one, i) for i in range(N_REQ)]
        start.wait()
        t0 = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    client.close()
    return wall, [lat for lat, _ in results], sum(n for _, n in results)


def engine_alone(model, tok, rows: list[str], prompts: list[list[int]]) -> tuple[float, list[float], int]:
    from lorakit.serve.engine import Engine, Request, SamplingParams

    engine = Engine(model, tok, max_batch_size=N_REQ)
    done: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(N_REQ):
        def emit(event, i=i):
            if event.finish_reason:
                done[i] = time.perf_counter() - t0
        engine.submit(Request(f"r{i}", rows[i], rows[i], prompts[i],
                              SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True), emit))
    while len(done) < N_REQ:
        engine.step()
    wall = time.perf_counter() - t0
    return wall, list(done.values()), engine.metrics["generation_tokens"]


def one_at_a_time(model, rows: list[str], prompts: list[list[int]]) -> tuple[float, list[float], int]:
    import torch

    t0, lat, tokens = time.perf_counter(), [], 0
    for name, p in zip(rows, prompts, strict=True):
        model.set_adapter(name)
        x = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        tokens += out.shape[1] - x.shape[1]
        lat.append(time.perf_counter() - t0)  # all arrived at t0: each waits for those before it
    return time.perf_counter() - t0, lat, tokens


def peft_static(model, rows: list[str], prompts: list[list[int]]) -> tuple[float, list[float], int]:
    import torch

    longest = max(map(len, prompts))
    ids = torch.zeros((N_REQ, longest), dtype=torch.long)  # left-padded (B, T)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - t0
    return wall, [wall] * N_REQ, (out.shape[1] - longest) * N_REQ  # a static batch ends together


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import peft
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    import lorakit

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, names, prompts = build(Path(tmp))
        mixed = [names[i % N_ADAPTERS] for i in range(N_REQ)]
        single = [names[0]] * N_REQ
        tok = AutoTokenizer.from_pretrained(folder / "base")
        ours = lorakit.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder / "base"), folder / names[0],
                                                 adapter_name=names[0])
        theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder / "base"), folder / names[0],
                                                adapter_name=names[0])
        for n in names[1:]:
            ours.load_adapter(folder / n, adapter_name=n)
            theirs.load_adapter(folder / n, adapter_name=n)
        ours.eval()
        theirs.eval()
        proc, url = start_server(folder, names)
        try:
            modes = {
                "serve, 8 adapters mixed": lambda: over_http(url, mixed, prompts),
                "(a) serve, all on one adapter": lambda: over_http(url, single, prompts),
                "engine alone, 8 adapters mixed (no HTTP)": lambda: engine_alone(ours, tok, mixed, prompts),
                "(b) one at a time, set_adapter + generate (lorakit)": lambda: one_at_a_time(ours, mixed, prompts),
                "(c) one static generate(adapter_names=...) batch (PEFT)": lambda: peft_static(theirs, mixed, prompts),
            }
            over_http(url, mixed, prompts)  # warm-up: first-call costs, the mixed path's plans
            engine_alone(ours, tok, mixed, prompts)
            results: dict[str, list[tuple[float, list[float], int]]] = {m: [] for m in modes}
            for r in range(args.rounds):
                for mode, fn in modes.items():
                    results[mode].append(fn())
                    wall, _, tokens = results[mode][-1]
                    print(f"round {r}: {mode}: {tokens} tokens in {wall:.2f} s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    rate = {m: [tokens / wall for wall, _, tokens in rs] for m, rs in results.items()}
    head = "serve, 8 adapters mixed"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{args.rounds} rounds, 1 torch thread")
    print("| mode | tokens/s | serve mixed / this (per round) | p50 latency | p99 latency |")
    print("|---|---|---|---|---|")
    for mode, rs in results.items():
        ratio = statistics.median([a / b for a, b in zip(rate[head], rate[mode], strict=True)])
        lat = [x for _, lats, _ in rs for x in lats]
        print(f"| {mode} | {statistics.median(rate[mode]):.0f} | {ratio:.2f}x | {pct(lat, 0.5):.2f} s | "
              f"{pct(lat, 0.99):.2f} s |")


if __name__ == "__main__":
    main()
