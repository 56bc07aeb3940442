"""Continuous batching for many adapters on one base: every request, whatever adapter it names, decodes in one batch.

One engine thread owns the model. Each iteration of its loop (:meth:`Engine.step`):

1. **join**: waiting requests (up to ``max_batch_size`` running) are prefilled together, left-padded, in one forward
   with their adapters per row; their first tokens are sampled and their KV caches join the running cache.
2. **decode**: one forward of one token per running row, ``adapter_names=rows`` (lorakit's mixed-adapter path:
   ``lorakit.variants.mixed``), then a token is sampled for each row.
3. **leave**: rows that finished (EOS, a stop string, ``max_tokens``, cancelled by a disconnect) are dropped from
   the batch and the cache at once, freeing their slot for the next step's joins.

KV cache layout (Orca-style iteration-level scheduling, https://www.usenix.org/conference/osdi22/presentation/yu;
the cache is transformers' ``DynamicCache`` with :class:`_SlackLayer` layers): all rows share the cache's columns,
each row right-aligned,

    keys/values (B, kv_heads, L, head_dim) per layer;  row i holds its pos_i tokens in columns [pad_i, L)
    attention_mask (B, L + 1)[i, j] = j >= pad_i;       position_ids (B, 1)[i] = pos_i

so a decode step appends one column for every row (the same forward as ``generate`` on a left-padded batch),
written in place into spare columns. A joining group of ``b`` rows with ``L'`` columns is left-padded to
``max(L, L')`` (and the running rows too) and concatenated on the batch axis; leaving rows are dropped with
``index_select`` and the columns that every remaining row pads are cut, so ``L`` stays the longest running row's
length (at most the context).

Sampling is per request (its own ``torch.Generator`` seeded by ``seed``), so a request's tokens do not depend on
what else is in the batch; ``temperature == 0`` is greedy (argmax), which gives ``PeftModel.generate``'s ids for
that adapter alone (up to float rounding of the batched matmuls).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

BASE = "__base__"
"""The row name of a request for the bare base model (lorakit's mixed-batch name for "no adapter")."""

log = logging.getLogger("lorakit.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests: the client should retry later (HTTP 429)."""


@dataclass
class SamplingParams:
    """What a request asks of the decoder (OpenAI's fields, validated by the HTTP layer)."""

    max_tokens: int
    """New tokens at most (the prompt plus these fit in the context)."""
    temperature: float = 1.0
    """0: greedy (argmax); else logits / temperature are sampled."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (https://arxiv.org/abs/1904.09751)."""
    seed: int | None = None
    """Seeds this request's own generator: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Text that ends the output (not included)."""
    ignore_eos: bool = False
    """Decode past the end-of-sequence token (vLLM's extension): exactly max_tokens tokens."""


class Event(NamedTuple):
    """One step of a request's output, as the engine thread hands it to the request's ``emit``."""

    text: str
    """New text since the last event (stop strings and incomplete UTF-8 held back until they resolve)."""
    token_ids: list[int]
    """New token ids since the last event (the EOS token included)."""
    finish_reason: str | None
    """None while running; "stop" (EOS or a stop string), "length" (max_tokens) or "abort" at the end."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    """A request as the engine sees it; ``emit`` is called from the engine thread with each :class:`Event`."""

    id: str
    model: str
    """The name the client asked for (logs and metrics)."""
    adapter: str
    """The adapter that runs it, or BASE."""
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)


class _Row:
    """A running request: its place in the cache and its output so far."""

    def __init__(self, req: Request, pad: int, generator: torch.Generator | None) -> None:
        self.req = req
        self.pad = pad  # columns of the cache before this row's first token
        self.pos = len(req.prompt_ids)  # tokens of this row in the cache
        self.tokens: list[int] = []  # generated ids (EOS included)
        self.sent = 0  # characters of the output text already emitted
        self.finish: str | None = None
        self.generator = generator
        self.first_token_at = 0.0


def stack_for(model: Any, names: list[str]) -> Any:
    """The model's reusable stacked-adapter handle for ``names`` (``PeftModel.stack_adapters``), passed as
    ``adapter_stack=`` beside ``adapter_names=``; None for a bare base model (no adapters yet). Rebuilt whenever
    adapters load or unload, over every adapter the model holds (one being unloaded stays until its last request
    leaves)."""
    if not hasattr(model, "stack_adapters") or not names:
        return None
    return model.stack_adapters(names)


class _SlackLayer(DynamicLayer):
    """transformers' DynamicLayer whose keys/values (B, kv_heads, L, head_dim) are views of buffers with room for
    ``SLACK`` more columns: a decode step writes its column in place instead of ``torch.cat`` copying the whole
    cache (the cat took ~18% of a batch-32 decode step in bench_serve's model, cProfile). The buffers are
    reallocated when full, or when rows join or leave (``assign``)."""

    SLACK = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        n, t = self.keys.shape[-2], key_states.shape[-2]
        if n + t > self._k.shape[-2]:
            self.assign(self.keys, self.values)
        self._k[:, :, n:n + t] = key_states
        self._v[:, :, n:n + t] = value_states
        self.keys, self.values = self._k[:, :, :n + t], self._v[:, :, :n + t]
        return self.keys, self.values

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold copies of ``keys`` / ``values`` (B, kv_heads, L, head_dim) with ``SLACK`` free columns after."""
        n = keys.shape[-2]
        self._k = keys.new_empty((*keys.shape[:2], n + self.SLACK, keys.shape[-1]))
        self._v = values.new_empty((*values.shape[:2], n + self.SLACK, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


class Engine:
    """Continuous batching of requests over the adapters of one ``PeftModel`` (or a bare base model).

    ``submit`` and ``cancel`` may be called from any thread; the model is only touched by the thread running
    :meth:`step` (started by :meth:`start`), which also runs adapter loads and unloads (:meth:`call`) between steps.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 32, max_queue: int = 256,
                 context_len: int | None = None) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        config = getattr(model, "config", None)
        self.context_len = context_len or getattr(config, "max_position_embeddings", None) or 2048
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.adapters: set[str] = set(getattr(model, "peft_config", {}) or {})
        self._unloading: set[str] = set()
        self._stack = stack_for(model, sorted(self.adapters))  # all the model holds
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5.25 renamed forward's past_key_values to cache (the old name warns until 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self._waiting: deque[Request] = deque()
        self._cancelled: set[str] = set()
        self._tasks: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._joining: list[Request] = []
        self._cache: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.metrics = {"requests": {}, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "rows": 0}
        """Counters for /metrics: requests by (model, finish_reason), tokens, decode steps and the rows they
        decoded (rows / steps: the mean batch size)."""

    # ---- any thread --------------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req``; raises :class:`QueueFull` when ``max_queue`` requests wait already, ``KeyError`` when its
        adapter is not served (checked under the lock that unloads take, so a queued adapter stays loaded)."""
        with self._wake:
            if req.adapter != BASE and req.adapter not in self.adapters:
                raise KeyError(req.adapter)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting, --max-queue "
                                f"{self.max_queue}); retry later")
            self._waiting.append(req)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Drop a request (client gone): a waiting one at once, a running one at the next step, freeing its slot."""
        with self._wake:
            waiting = next((r for r in self._waiting if r.id == request_id), None)
            if waiting is None:
                self._cancelled.add(request_id)
                self._wake.notify()
                return
            self._waiting.remove(waiting)
        self._abort_unstarted(waiting)

    def _abort_unstarted(self, req: Request, error: Exception | None = None) -> None:
        """End a request that never got a row (left the queue, or its prefill failed)."""
        self._count(req.model, "abort")
        try:
            req.emit(Event("", [], "abort", len(req.prompt_ids), 0))
        finally:
            log.info("%s model=%s prompt_tokens=%d completion_tokens=0 finish=abort latency=%.3fs%s", req.id, req.model,
                     len(req.prompt_ids), time.perf_counter() - req.arrived, f" error={error!r}" if error else "")

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (adapter loads, unloads); its result or error in the
        future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._tasks.append((fn, fut))
            self._wake.notify()
        return fut

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._rows or self._tasks or self._cancelled):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as err:  # a failed forward must not leave clients waiting forever
                log.exception("engine step failed; its requests end with finish_reason 'abort'")
                for row in self._rows:
                    if row.finish is None:
                        self._finish(row, "abort", error=err)
                started = {row.req.id for row in self._rows}
                for req in self._joining:
                    if req.id not in started:
                        self._abort_unstarted(req, err)
                self._rows, self._cache, self._joining = [], None, []
            time.sleep(0)  # let the HTTP thread take the GIL between steps (a tiny model's step is mostly Python)
        for row in self._rows:
            self._finish(row, "abort")
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            self._abort_unstarted(req)

    # ---- the engine thread -------------------------------------------------------------------------------------
    def step(self) -> None:
        """One iteration: tasks, cancellations, joins (one prefill), one decode step, leaves."""
        with self._wake:
            tasks, self._tasks = list(self._tasks), deque()
            cancelled, self._cancelled = self._cancelled, set()
        for fn, fut in tasks:
            try:
                fut.set_result(fn())
            except Exception as err:
                fut.set_exception(err)
        for row in self._rows:
            if row.req.id in cancelled:
                self._finish(row, "abort")
        with torch.inference_mode():
            self._leave()
            with self._wake:
                room = self.max_batch_size - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            if joining:
                self._joining = joining  # ended by _loop if the prefill fails
                self._join(joining)
                self._joining = []
                self._leave()
            if self._rows:
                self._decode()
                self._leave()
        self._drop_unloaded()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 adapters: list[str]) -> torch.Tensor:
        """Logits of the last position (B, vocab) for ids (B, T), mask (B, L + T), positions (B, T)."""
        kwargs: dict[str, Any] = {}
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = adapters
            if self._stack is not None:
                kwargs["adapter_stack"] = self._stack
        kwargs[self._cache_arg] = cache
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :].float()  # (B, vocab)

    def _join(self, reqs: list[Request]) -> None:
        """Prefill ``reqs`` in one left-padded batch and add them to the running batch."""
        from transformers import DynamicCache

        longest = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), longest), self.pad_id, dtype=torch.long)  # (b, T)
        mask = torch.zeros((len(reqs), longest), dtype=torch.long)  # (b, T)
        for i, r in enumerate(reqs):
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T), as generate computes them
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = DynamicCache()
        cache.layer_class_to_replicate = _SlackLayer  # each layer is created at its first update
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in reqs])
        rows = []
        for r in reqs:
            generator = None
            if r.params.temperature > 0:
                generator = torch.Generator()
                generator.manual_seed(r.params.seed if r.params.seed is not None else secrets.randbits(63))
            rows.append(_Row(r, longest - len(r.prompt_ids), generator))
            self.metrics["prompt_tokens"] += len(r.prompt_ids)
        self._merge(cache, rows, longest)
        self._emit(rows, self._sample(logits, rows))

    def _merge(self, cache: Any, rows: list[_Row], length: int) -> None:
        """Concatenate a prefilled group (``length`` columns) with the running batch, left-padding the shorter."""
        if self._cache is None:
            self._cache, self._rows = cache, rows
            return
        running = self._columns()
        width = max(running, length)
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            keys, values = (torch.cat([F.pad(getattr(old, n), (0, 0, width - running, 0)),  # (B + b, kv, L', hd)
                                       F.pad(getattr(new, n), (0, 0, width - length, 0))], dim=0)
                            for n in ("keys", "values"))
            old.assign(keys, values)
        for row in self._rows:
            row.pad += width - running
        for row in rows:
            row.pad += width - length
        self._rows = self._rows + rows

    def _columns(self) -> int:
        return self._cache.layers[0].keys.shape[-2]

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (B, 1)
        pads = torch.tensor([r.pad for r in rows], device=self.device)
        mask = (torch.arange(self._columns() + 1, device=self.device)[None, :] >= pads[:, None]).long()  # (B, L + 1)
        positions = torch.tensor([[r.pos] for r in rows], device=self.device)  # (B, 1)
        logits = self._forward(ids, mask, positions, self._cache, [r.req.adapter for r in rows])
        for r in rows:
            r.pos += 1
        self.metrics["steps"] += 1
        self.metrics["rows"] += len(rows)
        self._emit(rows, self._sample(logits, rows))

    def _leave(self) -> None:
        """Drop finished rows from the batch and the cache; cut the columns every remaining row pads."""
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache = None
            return
        index = torch.tensor(keep, device=self.device)
        cut = min(r.pad for r in self._rows)
        for layer in self._cache.layers:  # (B', kv_heads, L - cut, head_dim)
            layer.assign(layer.keys[:, :, cut:].index_select(0, index), layer.values[:, :, cut:].index_select(0, index))
        for r in self._rows:
            r.pad -= cut

    # ---- tokens -> text --------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row of logits (B, vocab): argmax for greedy rows, else top-p sampling at the row's
        temperature with the row's own generator."""
        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            p = r.req.params
            if p.temperature > 0:
                probs = torch.softmax(logits[i].cpu() / p.temperature, dim=-1)  # (vocab,); the generator is on CPU
                if p.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p >= p.top_p  # mass before the token already reaches top_p
                    probs = probs.scatter(0, order[drop], 0.0)
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return tokens

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        now = time.perf_counter()
        for r, tok in zip(rows, tokens, strict=True):
            if r.finish is not None:
                continue
            if not r.tokens:
                r.first_token_at = now
            r.tokens.append(tok)
            self.metrics["generation_tokens"] += 1
            finish = None
            eos = tok in self.eos_ids and not r.req.params.ignore_eos
            if eos:
                finish = "stop"
            elif len(r.tokens) >= r.req.params.max_tokens:
                finish = "length"
            out = r.tokens[:-1] if eos else r.tokens
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            cut = _find_stop(text, r.req.params.stop, r.sent)
            if cut is not None:
                text, finish = text[:cut], "stop"
            ready = len(text) if finish else len(text) - _held(text, r.req.params.stop)
            delta = text[r.sent:ready] if ready > r.sent else ""
            r.sent = max(r.sent, ready)
            if finish:
                self._finish(r, finish, delta, [tok])
            else:
                r.req.emit(Event(delta, [tok], None, len(r.req.prompt_ids), len(r.tokens)))

    def _finish(self, row: _Row, reason: str, text: str = "", tokens: list[int] | None = None,
                error: Exception | None = None) -> None:
        row.finish = reason
        req = row.req
        self._count(req.model, reason)
        try:
            req.emit(Event(text, tokens or [], reason, len(req.prompt_ids), len(row.tokens)))
        finally:
            now = time.perf_counter()
            ttft = f"{row.first_token_at - req.arrived:.3f}s" if row.tokens else "-"
            log.info("%s model=%s prompt_tokens=%d completion_tokens=%d finish=%s ttft=%s latency=%.3fs%s", req.id,
                     req.model, len(req.prompt_ids), len(row.tokens), reason, ttft, now - req.arrived,
                     f" error={error!r}" if error else "")

    def _count(self, model: str, reason: str) -> None:
        key = (model, reason)
        self.metrics["requests"][key] = self.metrics["requests"].get(key, 0) + 1

    # ---- adapters (engine thread, between steps) ---------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT-format adapter folder as ``name`` (the engine thread: call it through :meth:`call`).

        A bare base model becomes a ``PeftModel`` with its first adapter. On any error the model is as before."""
        from lorakit import PeftModel

        if name in self.adapters or name in self._unloading:
            raise ValueError(f"an adapter named {name!r} is already loaded" +
                             (" (it is being unloaded: retry when its requests finish)" if name in self._unloading
                              else ""))
        if hasattr(self.model, "peft_config"):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        with self._wake:
            self.adapters.add(name)
        self._stack = stack_for(self.model, sorted(self.model.peft_config))

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` now; its weights go once no running or waiting request uses it."""
        with self._wake:
            if name not in self.adapters:
                raise KeyError(name)
            self.adapters.discard(name)
            self._unloading.add(name)
        self._drop_unloaded()

    def served(self) -> list[str]:
        """The adapters served now, sorted (safe from any thread)."""
        with self._wake:
            return sorted(self.adapters)

    def _drop_unloaded(self) -> None:
        if not self._unloading:
            return
        with self._wake:
            busy = {r.req.adapter for r in self._rows} | {r.adapter for r in self._waiting}
        for name in sorted(self._unloading - busy):
            self.model.delete_adapter(name)
            self._unloading.discard(name)
            self._stack = stack_for(self.model, sorted(self.model.peft_config))


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the earliest stop string starts in ``text`` (searching from just before what was sent), or None."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not to send yet: the longest tail that begins a stop string, or an
    incomplete UTF-8 character (the tokenizer decodes it as U+FFFD)."""
    held = next((k for k in range(min(len(text), max(map(len, stops), default=0)), 0, -1)
                 if any(s.startswith(text[-k:]) for s in stops)), 0)
    return max(held, 1 if text.endswith("\ufffd") else 0)


_ids = itertools.count()


def request_id(prefix: str) -> str:
    """A unique id per request, OpenAI-style (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{time.time_ns():x}{next(_ids):04x}"
