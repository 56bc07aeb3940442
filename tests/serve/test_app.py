"""The HTTP app in-process (FastAPI's TestClient, no engine thread): what needs a queue that cannot drain, or a
server started without --adapter-root."""

import pytest

from tests.serve.conftest import TINY

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.serve.engine import Engine

    return Engine(AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY), max_queue=2)


def client(engine, **config):
    from fastapi.testclient import TestClient

    from lorakit.serve.app import ServeConfig, create_app

    return TestClient(create_app(engine, ServeConfig(base=str(TINY), **config)))  # no `with`: the engine never steps


def test_a_full_queue_is_429_with_openai_error_body(engine):
    from lorakit.serve.engine import BASE, Request, SamplingParams

    for i in range(2):
        engine.submit(Request(f"w{i}", "tiny_model", BASE, [5, 6], SamplingParams(max_tokens=4), lambda e: None))
    http = client(engine)
    r = http.post("/v1/completions", json={"model": "tiny_model", "prompt": "a"})
    assert r.status_code == 429
    assert r.json() == {"error": {"message": "the server's queue is full (2 requests waiting, --max-queue 2); retry "
                                             "later", "type": "RateLimitError", "param": None, "code": 429}}
    metrics = http.get("/metrics").text
    assert "lorakit_queue_length 2\n" in metrics and 'lorakit_rejected_requests_total{reason="queue_full"} 1' in metrics
    engine.cancel("w0")
    engine.cancel("w1")
    assert engine.queue_length == 0


def test_runtime_loading_is_refused_without_adapter_root(engine, adapter_root):
    http = client(engine)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapter_root / "ad1")})
    assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 403
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny_model"]
    assert http.get("/v1/nowhere").json()["error"]["code"] == 404


def test_prometheus_text_format(engine):
    lines = client(engine).get("/metrics").text.splitlines()
    for line in lines:
        if line.startswith("# TYPE"):
            assert line.split()[3] in ("counter", "gauge")
        elif not line.startswith("# HELP"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("lorakit_") and float(value) >= 0


@pytest.mark.parametrize(("args", "words"), [
    (["--adapter", "x=missing_folder"], "is not a folder"),
    (["--adapter", "x={root}/pickled"], "never unpickles"),
    (["--adapter", "tiny_model={root}/ad1"], "the base's served name"),
    (["--adapter", "a={root}/ad1", "--adapter", "a={root}/ad2"], "two adapters named"),
    (["--adapter-root", "missing_folder"], "is not a folder"),
])
def test_serve_command_refuses_bad_arguments_in_one_line(adapter_root, capsys, args, words):
    from lorakit.cli.main import main

    argv = ["serve", "--base", str(TINY), *[a.format(root=adapter_root) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit serve: error:") and words in err and "Traceback" not in err


def test_serve_command_refuses_a_busy_port_before_loading(capsys):
    import socket

    from lorakit.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--base", "no/such/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
