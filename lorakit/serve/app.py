"""`lorakit serve`: OpenAI's HTTP API (as vLLM serves it) over one base model and many LoRA adapters.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent
events), ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` (vLLM's runtime endpoints), ``GET /health``,
``GET /metrics`` (Prometheus text format). The ``model`` field picks the adapter, or the base under
``--served-model-name``. Requests go to one :class:`~lorakit.serve.engine.Engine`, which decodes all of them in
one batch whatever their adapters. FastAPI and uvicorn are the ``lorakit[serve]`` extra; only this command imports
this module.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lorakit.serve.engine import BASE, Engine, Event, QueueFull, SamplingParams, request_id
from lorakit.serve.engine import Request as EngineRequest
from lorakit.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    chunk,
    parse,
    refuse_unsupported,
    response_body,
)

log = logging.getLogger("lorakit.serve")
WEIGHTS = "adapter_model.safetensors"
#: OpenAI's default max_tokens for /v1/completions (chat's default is the rest of the context).
COMPLETION_MAX_TOKENS = 16


@dataclass
class ServeConfig:
    """What `lorakit serve` was started with."""

    base: str
    """Base model folder or Hub id."""
    adapters: list[tuple[str, str]] = field(default_factory=list)
    """(name, folder) of each adapter loaded at start."""
    host: str = "127.0.0.1"
    """Loopback by default: give 0.0.0.0 to listen on every interface."""
    port: int = 8000
    api_key: str | None = None
    """If set, /v1 routes need ``Authorization: Bearer KEY``."""
    served_model_name: str | None = None
    """The base's name in ``model`` fields; default: the base folder's name."""
    max_batch_size: int = 32
    """Requests decoded together at most; more wait in the queue."""
    max_queue: int = 256
    """Waiting requests at most; more are answered 429."""
    adapter_root: str | None = None
    """/v1/load_lora_adapter reads folders under it only; None refuses runtime loading."""
    quantization: str = "none"
    """none | nf4 (lorakit's 4-bit base, QLoRA) | fp4 | int8."""
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be in [0, 65535], got {self.port}")
        if self.quantization not in ("none", "nf4", "fp4", "int8"):
            raise ValueError(f"ServeConfig.quantization must be none, nf4, fp4 or int8, got {self.quantization!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ServeConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def base_name(self) -> str:
        return self.served_model_name or Path(self.base.rstrip("/")).name or self.base


def check_adapter_folder(path: Path, what: str) -> None:
    """An adapter folder lorakit serve will read: adapter_config.json and adapter_model.safetensors (a ``.bin`` is a
    pickle; the server never unpickles)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a folder")
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{what} {str(path)!r} has no adapter_config.json: it is not a PEFT adapter folder")
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"{what} {str(path)!r} has no {WEIGHTS}: lorakit serve reads safetensors only (it never "
                         "unpickles adapter_model.bin); save the adapter with safe_serialization=True")


def load_engine(config: ServeConfig) -> Engine:
    """The base model (quantized on load if asked), every ``--adapter``, and an engine over them."""
    from lorakit import PeftModel
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.evaluate import load_base_model

    names = [n for n, _ in config.adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"two adapters share a name in {names}: name them with --adapter NAME=PATH")
    if config.base_name in names or BASE in names:
        raise ValueError(f"an adapter is named {config.base_name!r}, the base's served name: rename one")
    for name, path in config.adapters:
        check_adapter_folder(Path(path), f"--adapter {name}=")
    model, tokenizer = load_base_model(config.base, config.dtype, QuantizationConfig(method=config.quantization))
    for i, (name, path) in enumerate(config.adapters):
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    limit = getattr(tokenizer, "model_max_length", None)
    context = getattr(model.config, "max_position_embeddings", None)
    if limit and limit < 10**7:  # transformers' "no limit" is a huge int
        context = min(context, limit) if context else limit
    return Engine(model, tokenizer, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                  context_len=context)


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The HTTP app over a started or unstarted ``engine`` (the app's lifespan starts and stops it)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    paths: dict[str, str] = dict(config.adapters)
    started = int(time.time())
    rejected = {"queue_full": 0, "unauthorized": 0, "bad_request": 0}

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        if err.status == 400:
            rejected["bad_request"] += 1
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception) -> JSONResponse:  # a bug: still OpenAI's body, and logged
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}: {err}").body(), status_code=500)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Response:
        if config.api_key is not None and request.url.path.startswith("/v1"):
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, f"Bearer {config.api_key}".encode()):  # no timing hint at the key
                rejected["unauthorized"] += 1
                err = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                    "server's --api-key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [{"id": config.base_name, "object": "model", "created": started, "owned_by": "lorakit",
                  "root": config.base, "parent": None}]
        cards += [{"id": n, "object": "model", "created": started, "owned_by": "lorakit", "root": paths.get(n),
                   "parent": config.base_name} for n in engine.served()]
        return {"object": "list", "data": cards}

    def unknown(model: str) -> ApiError:
        known = [config.base_name, *engine.served()]
        return ApiError(404, f"The model `{model}` does not exist; served models: {known}", "model")

    def adapter_of(model: str) -> str:
        if model == config.base_name:
            return BASE
        if model in engine.served():
            return model
        raise unknown(model)

    def sampling(req: Any, prompt_len: int, default_max: int | None) -> SamplingParams:
        refuse_unsupported(req)
        field, asked = "max_tokens", req.max_tokens
        if getattr(req, "max_completion_tokens", None) is not None:  # chat's newer name wins, as in OpenAI's API
            field, asked = "max_completion_tokens", req.max_completion_tokens
        if asked is not None and asked <= 0:
            raise ApiError(400, f"{field} must be at least 1, got {asked}", field)
        context = engine.context_len
        where = "messages" if isinstance(req, ChatRequest) else "prompt"
        if prompt_len >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your {where} "
                                f"resulted in {prompt_len} tokens, leaving no room for a completion. Please reduce "
                                f"the length of the {where}.", where)
        max_tokens = asked if asked is not None else (default_max or context - prompt_len)
        if prompt_len + max_tokens > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                                "completion). Please reduce the length of the prompt or completion.", where)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop=req.stops(), ignore_eos=req.ignore_eos)

    def completion_ids(req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request in lorakit serve, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            vocab = len(engine.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def chat_ids(req: ChatRequest) -> list[int]:
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, f"the base model {config.base_name!r} has no chat template: use /v1/completions",
                           "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            out = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)
        except Exception as err:  # the template's own raise_exception(...) (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {err}", "messages") from None
        return list(out["input_ids"])

    async def run(request: Request, chat: bool) -> Response:
        raw = await request.body()
        req = parse(ChatRequest if chat else CompletionRequest, raw)
        adapter = adapter_of(req.model)
        ids = chat_ids(req) if chat else completion_ids(req)
        params = sampling(req, len(ids), None if chat else COMPLETION_MAX_TOKENS)
        rid = request_id("chatcmpl" if chat else "cmpl")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()  # stream: every event
        parts: list[Event] = []  # otherwise: collected on the engine thread, one wake-up at the end
        finished = loop.create_future()

        def emit(event: Event) -> None:  # the engine thread
            try:
                if req.stream:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                else:
                    parts.append(event)
                    if event.finish_reason is not None:
                        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:  # the event loop closed (server shutting down)
                pass

        try:
            engine.submit(EngineRequest(rid, req.model, adapter, ids, params, emit))
        except QueueFull as err:
            rejected["queue_full"] += 1
            raise ApiError(429, str(err)) from None
        except KeyError:  # unloaded since adapter_of looked
            raise unknown(req.model) from None
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(stream(rid, req.model, chat, events, usage, req.return_token_ids),
                                     media_type="text/event-stream")
        gone = asyncio.ensure_future(disconnect(request))
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not finished.done():  # the client went away: its slot goes to the next request
            engine.cancel(rid)
            return Response(status_code=499)
        last = parts[-1]
        if last.finish_reason == "abort":
            raise ApiError(500, f"request {rid} was aborted by the engine (see the server log)")
        tokens = [t for e in parts for t in e.token_ids] if req.return_token_ids else None
        return JSONResponse(response_body(rid, req.model, chat, "".join(e.text for e in parts), last.finish_reason,
                                          ids, last.completion_tokens, tokens))

    async def disconnect(request: Request) -> None:
        """Returns when the client closes the connection (the body was read: the next message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def stream(rid: str, model: str, chat: bool, events: asyncio.Queue, include_usage: bool,
                     token_ids: bool) -> Any:
        """Server-sent events until the request finishes; a client that goes away cancels this generator (Starlette
        listens for the disconnect), and the request leaves the engine's batch at its next step."""
        done = False
        try:
            if chat:  # OpenAI's first chat chunk: the role, empty content
                yield chunk(rid, model, True, None, None, first=True)
            while True:
                event = await events.get()
                if event.finish_reason == "abort":
                    done = True
                    yield f"data: {json.dumps(ApiError(500, f'request {rid} was aborted by the engine').body())}\n\n"
                    break
                if event.text or event.finish_reason or token_ids:
                    yield chunk(rid, model, chat, event.text, event.finish_reason,
                                token_ids=event.token_ids if token_ids else None)
                if event.finish_reason is not None:
                    done = True
                    if include_usage:
                        yield chunk(rid, model, chat, None, None, counts=(event.prompt_tokens, event.completion_tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                engine.cancel(rid)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await run(request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        req = parse(LoadAdapterRequest, await request.body())
        if config.adapter_root is None:
            raise ApiError(403, "runtime adapter loading is off: start the server with --adapter-root DIR to load "
                                "adapter folders under DIR")
        if req.lora_name in (config.base_name, BASE):
            raise ApiError(400, f"{req.lora_name!r} is the base model's name: choose another lora_name", "lora_name")
        root = Path(config.adapter_root).resolve()
        path = Path(req.lora_path)
        real = (path if path.is_absolute() else root / path).resolve()  # symlinks and '..' resolved
        if real != root and root not in real.parents:
            raise ApiError(403, f"lora_path {req.lora_path!r} is outside --adapter-root: only folders under it are "
                                "loaded", "lora_path")
        try:
            check_adapter_folder(real, "lora_path")
        except (FileNotFoundError, ValueError) as err:
            raise ApiError(400, str(err).replace(str(real), req.lora_path), "lora_path") from None
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.load_adapter(req.lora_name, str(real))))
        except Exception as err:  # the folder's content is at fault (shapes, config): the model is unchanged
            message = str(err).replace(str(real), req.lora_path)
            raise ApiError(400, f"could not load adapter {req.lora_name!r}: {message}", "lora_path") from None
        paths[req.lora_name] = req.lora_path
        log.info("loaded adapter %s from %s", req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        req = parse(UnloadAdapterRequest, await request.body())
        if config.adapter_root is None:
            raise ApiError(403, "runtime adapter unloading is off: start the server with --adapter-root DIR")
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.unload_adapter(req.lora_name)))
        except KeyError:
            raise ApiError(404, f"The lora adapter '{req.lora_name}' cannot be found.", "lora_name") from None
        paths.pop(req.lora_name, None)
        log.info("unloaded adapter %s", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(prometheus_text(engine, rejected), media_type="text/plain; version=0.0.4")

    return app


def prometheus_text(engine: Engine, rejected: dict[str, int]) -> str:
    """Prometheus' text exposition format (https://prometheus.io/docs/instrumenting/exposition_formats/)."""
    m = engine.metrics
    lines = ["# HELP lorakit_requests_total Requests finished, by model and finish reason.",
             "# TYPE lorakit_requests_total counter"]
    for (model, reason), count in sorted(m["requests"].items()):
        lines.append(f'lorakit_requests_total{{model="{_label(model)}",finish_reason="{reason}"}} {count}')
    lines += ["# HELP lorakit_rejected_requests_total Requests refused before decoding, by reason.",
              "# TYPE lorakit_rejected_requests_total counter"]
    lines += [f'lorakit_rejected_requests_total{{reason="{k}"}} {v}' for k, v in sorted(rejected.items())]
    for name, kind, value, text in [
        ("prompt_tokens_total", "counter", m["prompt_tokens"], "Prompt tokens prefilled."),
        ("generation_tokens_total", "counter", m["generation_tokens"], "Tokens generated."),
        ("decode_steps_total", "counter", m["steps"], "Batched decode steps."),
        ("decode_rows_total", "counter", m["rows"], "Rows decoded, summed over steps (/ steps: mean batch size)."),
        ("queue_length", "gauge", engine.queue_length, "Requests waiting to join the batch."),
        ("batch_size", "gauge", engine.batch_size, "Requests decoding together now."),
        ("adapters", "gauge", len(engine.adapters), "Adapters served."),
    ]:
        lines += [f"# HELP lorakit_{name} {text}", f"# TYPE lorakit_{name} {kind}", f"lorakit_{name} {value}"]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def check_port(host: str, port: int) -> None:
    """Refuse a port something else listens on, or a host this machine does not have, naming the fix."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port, or stop "
                         "what uses it") from None


def serve(config: ServeConfig) -> None:
    """Load the model and adapters, then serve until interrupted (Ctrl-C or SIGTERM: a graceful shutdown)."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[lorakit serve] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    check_port(config.host, config.port)  # before minutes of model loading, not after
    engine = load_engine(config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("listening on %s without --api-key: anyone who reaches this port can use the server", config.host)
    log.info("serving %s with adapters %s on http://%s:%d (pid %d)", config.base_name, sorted(engine.adapters),
             config.host, config.port, os.getpid())
    uvicorn.run(create_app(engine, config), host=config.host, port=config.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)
