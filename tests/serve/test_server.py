"""`lorakit serve` as a real server process on 127.0.0.1, driven by the official openai client and raw HTTP:
16 concurrent requests over 4 adapters (LoRA, DoRA, modules_to_save, rsLoRA) give each adapter's
PeftModel.generate ids; chat, streaming, model listing; every bad input is a 4xx with OpenAI's error body; a full
queue is 429; closing a stream frees its slot; adapters load and unload while other requests run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.serve.conftest import PROMPTS, TINY, reference_ids

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
ADAPTERS = ["ad1", "ad2", "ad3", "ad4"]
NEW = 10
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def post(self, path: str, body, headers=AUTH, **kw):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=120, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="module")
def server(adapter_root, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit.cli.main", "serve", "--base", str(TINY), "--port", str(port),
           "--api-key", KEY, "--adapter-root", str(adapter_root), "--max-batch-size", "8", "--max-queue", "16"]
    for name in ADAPTERS:
        cmd += ["--adapter", f"{name}={adapter_root / name}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as the tests' own process
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # imports and model loading on a loaded 2-core machine
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not answer /health within 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    server = Server(url, proc, log)
    yield server
    server.client.close()  # no idle keep-alive connection for the graceful shutdown to wait out
    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn's graceful shutdown
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server did not stop within 30 s of SIGINT")
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def test_16_concurrent_requests_over_4_adapters_give_generate_ids(server, adapter_root, tokenizer):
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    refs = {n: reference_ids(adapter_root / n, prompts, NEW) for n in ADAPTERS}
    assert len({tuple(map(tuple, r)) for r in refs.values()}) == len(ADAPTERS), "adapters must change the output"
    jobs = [(name, p) for name in ADAPTERS for p in range(len(PROMPTS))]
    barrier = threading.Barrier(len(jobs))
    steps, rows = server.metric("lorakit_decode_steps_total"), server.metric("lorakit_decode_rows_total")

    def ask(job):
        name, p = job
        barrier.wait(timeout=60)
        return server.client.completions.create(model=name, prompt=PROMPTS[p], max_tokens=NEW, temperature=0,
                                                extra_body={"return_token_ids": True})

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, p), answer in zip(jobs, answers, strict=True):
        choice, ref = answer.choices[0], refs[name][p]
        assert choice.token_ids == ref, (name, p)
        assert choice.prompt_token_ids == prompts[p]
        assert choice.text == tokenizer.decode(ref, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if ref[-1] == tokenizer.eos_token_id else "length")
        assert answer.model == name and answer.usage.completion_tokens == len(ref)
        assert answer.usage.prompt_tokens == len(prompts[p])
    steps = server.metric("lorakit_decode_steps_total") - steps
    rows = server.metric("lorakit_decode_rows_total") - rows
    assert rows / steps > 1, "the requests were never decoded together"


def test_models_chat_and_streaming(server, adapter_root, tokenizer):
    ids = {m.id for m in server.client.models.list().data}
    assert ids >= {"tiny_model", *ADAPTERS}
    messages = [{"role": "user", "content": "hello there"}]
    chat = server.client.chat.completions.create(model="ad2", messages=messages, max_tokens=NEW, temperature=0)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    ref = reference_ids(adapter_root / "ad2", [list(prompt)], NEW)[0]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tokenizer.decode(ref, skip_special_tokens=True)
    assert chat.usage.prompt_tokens == len(prompt) and chat.usage.completion_tokens == len(ref)

    chunks = list(server.client.chat.completions.create(model="ad2", messages=messages, max_tokens=NEW,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)

    whole = server.client.completions.create(model="tiny_model", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    parts = list(server.client.completions.create(model="tiny_model", prompt=PROMPTS[0], max_tokens=NEW,
                                                  temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


BAD = [  # (body, status, param, words in the message)
    (b'{"model": "ad1", "prompt": ', 400, None, "not valid JSON"),
    (b"", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    ({"model": "ad1", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ({"model": "ad1", "prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"model": "ad1", "prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": "ad1", "prompt": 5}, 400, "prompt", "none of its accepted types (got 5)"),
    ({"model": "ad1"}, 400, "prompt", "Field required"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ({"model": "ad1", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"model": "ad1", "prompt": "x", "max_tokens": -3}, 400, "max_tokens", "at least 1"),
    ({"model": "ad1", "prompt": [5] * 300, "max_tokens": 1}, 400, "prompt", "maximum context length is 256"),
    ({"model": "ad1", "prompt": "x", "max_tokens": 1000}, 400, "prompt", "maximum context length is 256"),
    ({"model": "ad1", "prompt": [5, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "ad1", "prompt": ""}, 400, "prompt", "empty"),
    ({"model": "ad1", "prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ({"model": "ad1", "prompt": "x", "logprobs": 2}, 400, "logprobs", "not implemented"),
    ({"model": "ad1", "prompt": "x", "stop": [""]}, 400, "stop", "must not be empty"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD)
def test_bad_completion_requests_get_openai_error_bodies(server, body, status, param, words):
    r = server.post("/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param and words in error["message"], error


def test_bad_chat_requests_and_auth(server):
    for body, words in [({"model": "ad1", "messages": "hi"}, "valid array"),
                        ({"model": "ad1", "messages": []}, "at least 1"),
                        ({"model": "ad1", "messages": [{"role": "user", "content": "word " * 300}]},
                         "leaving no room for a completion"),
                        ({"model": "ad1", "messages": [{"role": "robot", "content": "x"}]}, "'system'"),
                        ({"model": "ad1", "messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]},
                         "tools")]:
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    ok = {"model": "ad1", "prompt": "x", "max_tokens": 2, "some_future_field": {"a": 1}}  # unknown: ignored
    assert server.post("/v1/completions", ok).status_code == 200
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        r = server.post("/v1/completions", ok, headers=headers)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_queue_limit_and_closed_streams_free_their_slots(server):
    """30 streams at once: those beyond 8 decoding + 16 queued are 429 (how many depends on how fast the engine
    drains while they arrive; test_app.py checks the 429 with a queue that cannot drain). Closing every stream
    mid-generation ends its request: the batch and the queue empty long before 240 tokens each could finish."""
    body = {"model": "ad3", "messages": [{"role": "user", "content": "a"}], "max_tokens": 240, "ignore_eos": True,
            "stream": True}
    counted = 'lorakit_requests_total{model="ad3",finish_reason='
    before = {r: server.metric(counted + f'"{r}"') for r in ("abort", "length")}
    start, opened, release = threading.Barrier(30), threading.Barrier(31), threading.Event()
    statuses, errors = [], []

    def hold():
        start.wait(timeout=60)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
            statuses.append(r.status_code)
            if r.status_code == 200:
                next(r.iter_lines())  # the first chunk: decoding or queued
            else:
                errors.append(json.loads(r.read())["error"])
            opened.wait(timeout=60)
            release.wait(timeout=60)
        # leaving the block closes the connection mid-stream

    threads = [threading.Thread(target=hold) for _ in range(30)]
    for t in threads:
        t.start()
    opened.wait(timeout=60)
    accepted = statuses.count(200)
    assert statuses.count(429) == 30 - accepted
    assert all(e["code"] == 429 and "--max-queue 16" in e["message"] for e in errors)
    release.set()
    for t in threads:
        t.join(timeout=60)
    for _ in range(300):  # bounded: 30 s
        if server.metric("lorakit_batch_size") == 0 and server.metric("lorakit_queue_length") == 0:
            break
        time.sleep(0.1)
    assert server.metric("lorakit_batch_size") == 0 and server.metric("lorakit_queue_length") == 0
    ended = {r: server.metric(counted + f'"{r}"') - before[r] for r in before}
    assert ended["abort"] >= 1 and ended["abort"] + ended["length"] == accepted
    answer = server.client.completions.create(model="ad3", prompt="a", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens >= 1  # still serving


def test_a_client_that_goes_away_mid_request_frees_its_slot(server):
    counted = 'lorakit_requests_total{model="ad4",finish_reason="abort"'
    before = server.metric(counted)
    body = {"model": "ad4", "prompt": "a", "max_tokens": 240, "ignore_eos": True}  # >= 0.4 s of decoding alone
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(30, read=0.1))
    for _ in range(300):  # bounded: 30 s
        if server.metric(counted) == before + 1:
            break
        time.sleep(0.1)
    assert server.metric(counted) == before + 1 and server.metric("lorakit_batch_size") == 0


def test_adapters_load_and_unload_while_requests_run(server, adapter_root, tokenizer):
    long = {"model": "ad1", "prompt": "a", "max_tokens": 150, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        background = pool.submit(server.post, "/v1/completions", long)
        r = server.post("/v1/load_lora_adapter", {"lora_name": "ad5", "lora_path": "ad5"})
        assert r.status_code == 200 and "Success" in r.text
        assert "ad5" in {m.id for m in server.client.models.list().data}
        answer = server.client.completions.create(model="ad5", prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                                  extra_body={"return_token_ids": True})
        prompt = tokenizer(PROMPTS[0])["input_ids"]
        assert answer.choices[0].token_ids == reference_ids(adapter_root / "ad5", [prompt], NEW)[0]
        assert server.post("/v1/unload_lora_adapter", {"lora_name": "ad5"}).status_code == 200
        assert server.post("/v1/completions", {"model": "ad5", "prompt": "x"}).status_code == 404
        assert server.post("/v1/unload_lora_adapter", {"lora_name": "ad5"}).status_code == 404
        done = background.result(timeout=120)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 150


def test_load_lora_adapter_refusals_leave_the_server_serving(server, adapter_root):
    link = adapter_root / "escape"
    if not link.exists():
        link.symlink_to(TINY, target_is_directory=True)
    for body, status, words in [
        ({"lora_name": "x", "lora_path": "../outside"}, 403, "outside --adapter-root"),
        ({"lora_name": "x", "lora_path": str(TINY)}, 403, "outside --adapter-root"),
        ({"lora_name": "x", "lora_path": "escape"}, 403, "outside --adapter-root"),  # a symlink out of the root
        ({"lora_name": "x", "lora_path": "missing"}, 400, "is not a folder"),
        ({"lora_name": "x", "lora_path": "pickled"}, 400, "never unpickles"),
        ({"lora_name": "ad1", "lora_path": "ad5"}, 400, "already loaded"),
        ({"lora_name": "tiny_model", "lora_path": "ad5"}, 400, "base model's name"),
        ({"lora_name": "x"}, 400, "Field required"),
        ({"lora_name": "x", "lora_path": "other_base"}, 400, "shape mismatch"),
    ]:
        r = server.post("/v1/load_lora_adapter", body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    r = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "other_base"})
    assert "the adapter file has (4, 64), the model expects (4, 128)" in r.json()["error"]["message"]
    assert "x" not in {m.id for m in server.client.models.list().data}
    assert server.client.completions.create(model="ad1", prompt="a", max_tokens=2).usage.completion_tokens >= 1


def test_a_log_line_per_request(server):
    answer = server.client.completions.create(model="ad2", prompt="a", max_tokens=3, temperature=0)
    for _ in range(100):  # bounded: the line is written as the request ends, maybe after the response
        lines = [ln for ln in server.log.read_text().splitlines() if ln.startswith(f"[lorakit serve] {answer.id} ")]
        if lines:
            break
        time.sleep(0.1)
    assert len(lines) == 1, server.log.read_text()[-2000:]
    assert re.fullmatch(rf"\[lorakit serve\] {answer.id} model=ad2 prompt_tokens={answer.usage.prompt_tokens} "
                        rf"completion_tokens={answer.usage.completion_tokens} finish=\w+ ttft=[0-9.]+s "
                        r"latency=[0-9.]+s", lines[0]), lines[0]
