"""What the HTTP server does, as plain async functions over lmforge's Python API; the routes in
app.py only parse a body and call one of these.

Every generation goes through a model's engine, stepped by one Driver loop (on `lmforge
serve`'s main thread): the requests of all clients are decoded together, one forward pass a
step, joining and leaving between steps (continuous batching), each with its own sampling
settings, stops and constraint. A call's events come back to the event loop once per step; a
client that goes away, or a request past its time limit, is cancelled and frees its slot at
the next step. The encoder's forward passes run on the same driving thread, between steps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.api import LM, describe_spec, mark_complete
from lmforge.engine import Event, Request
from lmforge.engine.engine import Driver
from lmforge.engine.constraint import Spec
from lmforge.errors import LMForgeError
from lmforge.images import IMAGE_MARK, decode_data_uri
from lmforge.server.protocol import AskRequest, ChatRequest, CompletionRequest, EmbeddingRequest, Message
from lmforge.tasks.structured import ToolTurn, prompt_ids, tool_turn

Disconnected = Callable[[], Awaitable[bool]]


class APIError(Exception):
    """An error for the client, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for, and how much the server takes on at once."""
    max_body: int = 2 * 1024 * 1024
    """Bytes in a request body (413 past it)."""
    max_tokens: int = 2048
    """The largest max_tokens a request may ask for; also the default when it asks for none."""
    max_n: int = 8
    """Choices per request (n), and prompts per completions request."""
    parallel: int = 8
    """Sequences decoded together per model (the engine's slots)."""
    max_queue: int = 64
    """Requests waiting for a slot, per model; past it new ones get 503 (retry later)."""
    timeout: float = 600.0
    """Seconds a generation may take; past it, it ends with finish_reason "length"."""
    max_embed_inputs: int = 2048
    """Texts in one embeddings request."""


@dataclass
class Served:
    """A language model behind the API."""
    name: str
    lm: LM
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat_template(self) -> str:
        return "model" if self.lm.tokenizer.chat_template else "plain fallback"

    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and bytes, as OpenAI's logprobs show them (control tokens by name)."""
        pieces = self.lm.tokenizer.token_byte_strings()  # (computed once, kept by the tokenizer)
        raw = pieces[token_id] if token_id < len(pieces) else b""
        if not raw:
            name = self.lm.tokenizer.tk.id_to_token(token_id) or ""
            return name, list(name.encode())
        return raw.decode("utf-8", errors="replace"), list(raw)


class Metrics:
    """Counts for /metrics (rendered by the prometheus client in app.py)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()  # (the *_created series only repeat the start time)

        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens read.", ["model"], registry=self.registry)
        self.cached_tokens = Counter("lmforge_cached_prompt_tokens", "Prompt tokens reused from a slot's cache.",
                                     ["model"], registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated.", ["model"],
                                         registry=self.registry)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              ["model"], registry=self.registry,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, float("inf")))
        self.latency = Histogram("lmforge_request_seconds", "From a generation request's arrival to its end.",
                                 ["model"], registry=self.registry,
                                 buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, float("inf")))
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last WINDOW seconds
        self._lock = threading.Lock()

    WINDOW = 10.0

    def tokens_out(self, model: str, n: int) -> None:
        self.completion_tokens.labels(model).inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.WINDOW


class Service:
    def __init__(self, models: dict[str, LM], encoder=None, encoder_name: str | None = None,
                 collections: list[str] | tuple = (), limits: Limits | None = None):
        if not models and encoder is None:
            raise LMForgeError("nothing to serve: give a language model or an embedding model")
        self.limits = limits or Limits()
        self.models = {name: Served(name, lm) for name, lm in models.items()}
        self.encoder, self.encoder_name = encoder, encoder_name
        self.collections = list(collections)
        self.metrics = Metrics()
        self._local = threading.local()  # each worker thread's open collections (sqlite is per thread)
        self.started = int(time.time())
        for e in self.engines:
            e.max_slots = self.limits.parallel
        self.driver = Driver(self.engines)  # steps the engines and runs the encoder's forwards

    # ---- life --------------------------------------------------------------------------------
    @property
    def engines(self) -> list:
        return [m.lm.engine for m in self.models.values()]

    def start(self) -> None:
        """Drive the engines from a background thread (tests, embedding the app elsewhere);
        `lmforge serve` runs `self.driver` on its main thread instead."""
        self.driver.start()

    def stop(self) -> None:
        self.driver.stop()

    async def on_driver(self, fn: Callable[[], Any]) -> Any:
        """fn's result, computed on the driving thread between engine steps: all that uses
        OpenMP stays on one thread (see Engine.start: a second thread that ran a parallel
        region, even once, halves decoding on 2 cores for as long as it lives)."""
        return await asyncio.wrap_future(self.driver.submit(fn))

    def busy_slots(self) -> dict[str, int]:
        return {n: m.lm.engine.active for n, m in self.models.items()}

    def queue_depth(self) -> dict[str, int]:
        return {n: m.lm.engine.waiting for n, m in self.models.items()}

    def health(self) -> dict:
        return {"status": "ok", "models": list(self.models), "busy_slots": sum(self.busy_slots().values()),
                "queue": sum(self.queue_depth().values())}

    # ---- models ------------------------------------------------------------------------------
    def list_models(self) -> dict:
        data = []
        for m in self.models.values():
            data.append({"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge",
                         "kind": "chat" if m.lm.tokenizer.chat_template else "completion",
                         "chat_template": m.chat_template, "context_length": m.lm.context_limit,
                         "vision": m.lm.vision is not None})
        if self.encoder is not None:
            data.append({"id": self.encoder_name, "object": "model", "created": self.started, "owned_by": "lmforge",
                         "kind": "embedding", "dimensions": self.encoder.dim})
        return {"object": "list", "data": data, "collections": self.collections}

    def model(self, name: str | None) -> Served:
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name not in self.models:
            known = ", ".join(self.models) or "none"
            raise APIError(404, f"the model {name!r} is not served here (language models: {known})",
                           param="model", code="model_not_found")
        return self.models[name]

    def _check_queue(self, m: Served, n: int) -> None:
        """503 when the request would wait behind a full queue (free slots take it at once)."""
        engine = m.lm.engine
        free = max(0, engine.max_slots - engine.active)
        if engine.waiting + n > self.limits.max_queue + free:
            raise APIError(503, f"the server is busy ({engine.waiting} requests waiting); retry shortly",
                           type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})

    def _max_tokens(self, asked: int | None) -> int:
        if asked is not None and asked > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {asked:,}; this server allows at most {self.limits.max_tokens:,}",
                           param="max_tokens")
        return asked or self.limits.max_tokens

    def _n(self, n: int, prompts: int = 1) -> None:
        if n * prompts > self.limits.max_n:
            raise APIError(400, f"n x prompts is {n * prompts}; this server allows at most {self.limits.max_n}",
                           param="n")

    # ---- chat ----------------------------------------------------------------------------------
    async def chat(self, body: ChatRequest, disconnected: Disconnected) -> dict | AsyncIterator[str]:
        """/v1/chat/completions: a response dict, or with stream=True the SSE lines."""
        t0 = time.perf_counter()
        m = self.model(body.model)
        self._n(body.n)
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens)
        images: list[bytes] = []
        messages = chat_messages(body.messages, images)
        if images and m.lm.vision is None:
            raise APIError(400, f"model {m.name!r} takes no images (serve a run made by lmforge finetune vision)",
                           param="messages")
        if images and body.tools:
            raise APIError(400, "tools with images are not supported", param="tools")
        spec = response_spec(body)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        if tools and spec is not None:
            raise APIError(400, "give tools or a response_format / guided output, not both", param="tools")
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        sampling = _sampling(body)

        def build(i: int) -> tuple[Request, ToolTurn | None]:
            opts = dict(sampling, seed=None if body.seed is None else body.seed + i)
            if tools and choice != "none":
                turn = tool_turn(m.lm, messages, tools, choice, max_tokens, stop=_stops(body.stop),
                                 logprobs=body.logprobs, top_logprobs=top, **opts)
                return turn.request, turn
            msgs = describe_spec(messages, spec) if spec is not None else messages
            if images:  # the image encoder's forward runs on the driving thread, like every forward
                ids = m.lm.chat_ids(msgs, len(images))
                return self.driver.submit(lambda: m.lm.request(
                    ids, max_tokens, stop=_stops(body.stop), logprobs=body.logprobs, top_logprobs=top, spec=spec,
                    images=images, **opts)).result(), None
            ids = prompt_ids(m.lm, msgs)
            return m.lm.request(ids, max_tokens, stop=_stops(body.stop), logprobs=body.logprobs, top_logprobs=top,
                                spec=spec, **opts), None

        # (building may compile a schema or render a long template: off the event loop)
        built = await asyncio.to_thread(lambda: [_api(build, i) for i in range(body.n)])
        for req, _ in built:
            _ignore_eos(req, body.ignore_eos)
        self._check_queue(m, body.n)
        call = Call(self, m, [r for r, _ in built], disconnected, t0)
        turns = [t for _, t in built]
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            return self._chat_stream(call, turns, rid, created, body)
        texts, lps = [[] for _ in built], [[] for _ in built]
        async for i, ev in call.events():
            texts[i].append(ev.text)
            if body.logprobs and ev.token is not None and not call.is_stop_token(ev):
                lps[i].append(self._chat_logprob(m, ev))
        choices = []
        for i, turn in enumerate(turns):
            text, last = "".join(texts[i]), call.last[i]
            msg = _api(turn.message, text, last.finish_reason, last.complete) if turn is not None else \
                {"role": "assistant", "content": text, "finish_reason": last.finish_reason}
            finish = msg.pop("finish_reason")
            choices.append({"index": i, "message": msg, "logprobs": {"content": lps[i]} if body.logprobs else None,
                            "finish_reason": _finish(finish)})
        return {"id": rid, "object": "chat.completion", "created": created, "model": m.name, "choices": choices,
                "usage": call.usage(), "system_fingerprint": None}

    async def _chat_stream(self, call: "Call", turns: list, rid: str, created: int, body: ChatRequest):
        m = call.served
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": m.name,
                   "system_fingerprint": None,
                   "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            return sse(out)

        try:
            for i in range(len(turns)):
                yield chunk(i, {"role": "assistant", "content": ""})
            # a tool turn's text is held until its first characters tell a call ("{") from an answer
            held: list[list[str] | None] = [[] if t is not None else None for t in turns]
            held_lps: list[list[dict]] = [[] for _ in turns]
            async for i, ev in call.events():
                lp = [self._chat_logprob(m, ev)] if body.logprobs and ev.token is not None and \
                    not call.is_stop_token(ev) else []
                if held[i] is not None:
                    held[i].append(ev.text)
                    held_lps[i] += lp
                    pending = "".join(held[i])
                    if pending and not pending.startswith("{"):  # an answer: stream it from here on
                        held[i] = None
                        yield chunk(i, {"content": pending}, logprobs={"content": held_lps[i]} if lp else None)
                elif ev.text or lp:
                    yield chunk(i, {"content": ev.text}, logprobs={"content": lp} if lp else None)
                if ev.finish_reason is not None:
                    if held[i] is not None and "".join(held[i]):
                        msg = _api(turns[i].message, "".join(held[i]), ev.finish_reason, ev.complete)
                        calls = [dict(c, index=k) for k, c in enumerate(msg.get("tool_calls") or [])]
                        yield chunk(i, {"tool_calls": calls} if calls else {"content": msg["content"]})
                        yield chunk(i, {}, _finish(msg["finish_reason"]))
                    else:
                        yield chunk(i, {}, _finish(ev.finish_reason))
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": m.name,
                           "system_fingerprint": None, "choices": [], "usage": call.usage()})
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    def _chat_logprob(self, m: Served, ev: Event) -> dict:
        text, raw = m.token_piece(ev.token)
        top = []
        for tid, lp in ev.top_logprobs or []:
            t, b = m.token_piece(tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        return {"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top}

    # ---- completions -----------------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, disconnected: Disconnected) -> dict | AsyncIterator[str]:
        """/v1/completions: plain continuation of one prompt or several."""
        t0 = time.perf_counter()
        m = self.model(body.model)
        if body.suffix:
            raise APIError(400, "suffix (fill in the middle) is not supported", param="suffix")
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        prompts = _prompts(body.prompt)
        self._n(body.n, len(prompts))
        max_tokens = self._max_tokens(body.max_tokens)
        top = body.logprobs or 0
        sampling = _sampling(body)
        vocab = m.lm.config.vocab_size

        def build() -> list[tuple[int, Request]]:
            out = []
            for p, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids = m.lm.encode_prompt(prompt)
                else:
                    if any(not 0 <= t < vocab for t in prompt):
                        raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
                    ids = list(prompt)
                    m.lm._check_length(len(ids))
                for i in range(body.n):
                    seed = None if body.seed is None else body.seed + i
                    out.append((p, m.lm.request(ids, max_tokens, stop=_stops(body.stop), logprobs=body.logprobs is not None,
                                                top_logprobs=top, **dict(sampling, seed=seed))))
            return out

        built = await asyncio.to_thread(_api, build)
        for _, req in built:
            _ignore_eos(req, body.ignore_eos)
        self._check_queue(m, len(built))
        call = Call(self, m, [r for _, r in built], disconnected, t0)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        prompt_text = [p if isinstance(p, str) else m.lm.tokenizer.decode(list(p)) for p in prompts]
        echo = [prompt_text[p] if body.echo else "" for p, _ in built]
        want_lp = body.logprobs is not None

        def logprobs(evs: list[Event], offset: int) -> dict | None:
            if not want_lp:
                return None
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if top else None, "text_offset": []}
            for ev in evs:
                if ev.token is None or call.is_stop_token(ev):
                    continue
                text, _ = m.token_piece(ev.token)
                out["tokens"].append(text)
                out["token_logprobs"].append(ev.logprob)
                out["text_offset"].append(offset)
                offset += len(ev.text)
                if top:
                    out["top_logprobs"].append({m.token_piece(t)[0]: lp for t, lp in ev.top_logprobs or []})
            return out

        def choice(i: int, text: str, evs, finish, offset: int) -> dict:
            return {"text": text, "index": i, "logprobs": logprobs(evs, offset), "finish_reason": finish}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                def chunk(c: dict) -> str:
                    return sse({"id": rid, "object": "text_completion", "created": created, "model": m.name,
                                "choices": [c], **({"usage": None} if include_usage else {})})
                offsets = [len(e) for e in echo]
                try:
                    for i, e in enumerate(echo):
                        if e:
                            yield chunk(choice(i, e, [], None, 0))
                    async for i, ev in call.events():
                        finish = _finish(ev.finish_reason) if ev.finish_reason else None
                        if ev.text or finish or (want_lp and ev.token is not None and not call.is_stop_token(ev)):
                            yield chunk(choice(i, ev.text, [ev], finish, offsets[i]))
                        offsets[i] += len(ev.text)
                    if include_usage:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": m.name,
                                   "choices": [], "usage": call.usage()})
                except APIError as e:
                    yield sse(e.body())
                yield "data: [DONE]\n\n"
            return stream()
        evs: list[list[Event]] = [[] for _ in built]
        async for i, ev in call.events():
            evs[i].append(ev)
        choices = [choice(i, echo[i] + "".join(e.text for e in evs[i]), evs[i],
                          _finish(call.last[i].finish_reason), len(echo[i])) for i in range(len(built))]
        return {"id": rid, "object": "text_completion", "created": created, "model": m.name, "choices": choices,
                "usage": call.usage()}

    # ---- embeddings --------------------------------------------------------------------------------
    async def embed(self, body: EmbeddingRequest) -> dict:
        if self.encoder is None or body.model != self.encoder_name:
            have = self.encoder_name or "none (start the server with --embed-model)"
            raise APIError(404, f"the embedding model {body.model!r} is not served here (embedding model: {have})",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if len(texts) > self.limits.max_embed_inputs:
            raise APIError(400, f"{len(texts)} inputs; this server embeds at most {self.limits.max_embed_inputs} "
                                f"per request", param="input")
        if body.dimensions is not None and body.dimensions != self.encoder.dim:
            raise APIError(400, f"{self.encoder_name} gives {self.encoder.dim} dimensions; it cannot give "
                                f"{body.dimensions}", param="dimensions")

        def run():
            n_tokens = sum(len(t) for t in self.encoder.tokenize(texts))
            return self.encoder.embed(texts).astype(np.float32), n_tokens

        vecs, n_tokens = await self.on_driver(lambda: _api(run))
        data = []
        for i, v in enumerate(vecs):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": self.encoder_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    # ---- grounded answers --------------------------------------------------------------------------
    def _collection(self, name: str):
        from lmforge.rag.collection import Collection

        open_ = getattr(self._local, "collections", None)
        if open_ is None:
            open_ = self._local.collections = {}
        if name not in open_:
            col = Collection.open(name)
            # dense search where the collection holds this encoder's vectors; BM25 alone where it
            # has none (given an encoder, a collection would embed all its chunks on the spot)
            if self.encoder is not None and col.embed_model == str(self.encoder.spec):
                col.close()
                col = Collection.open(name, encoder=_OnDriver(self.encoder, self.driver.submit))
            open_[name] = col
        return open_[name]

    async def ask(self, body: AskRequest, disconnected: Disconnected) -> dict | AsyncIterator[str]:
        """/v1/rag/ask: an answer from a collection, with numbered citations and their sources."""
        from lmforge.rag.ask import ask

        if not self.collections:
            raise APIError(404, "no collection is served here (start the server with --collection NAME)",
                           param="collection", code="collection_not_found")
        name = body.collection or self.collections[0]
        if name not in self.collections:
            raise APIError(404, f"the collection {name!r} is not served here (collections: "
                                f"{', '.join(self.collections)})", param="collection", code="collection_not_found")
        m = self.model(body.model)
        max_tokens = self._max_tokens(body.max_tokens)
        mode = body.mode or ("hybrid" if self.encoder is not None else "bm25")
        if mode != "bm25" and self.encoder is None:
            raise APIError(400, f"mode {mode!r} needs the embedding model; use mode 'bm25' or start the server "
                                f"with --embed-model", param="mode")
        self._check_queue(m, 1)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        t0 = time.perf_counter()

        def on_text(text: str) -> None:
            if stop.is_set():
                raise _Stopped()
            loop.call_soon_threadsafe(pieces.put_nowait, ("text", text))

        def run():
            try:
                col = self._collection(name)
                ans = ask(body.question, col, m.lm, k=body.k, mode=mode, max_new_tokens=max_tokens,
                          on_text=on_text)
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", ans))
            except _Stopped:
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", None))
            except LMForgeError as e:
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", APIError(400, str(e))))
            except Exception as e:  # (logged by the caller; the client gets no stack trace)
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", e))

        rid, created = "rag-" + uuid.uuid4().hex, int(time.time())
        worker = loop.run_in_executor(None, run)

        async def items():
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(pieces.get(), 0.5)
                    except asyncio.TimeoutError:
                        if await disconnected() or time.perf_counter() - t0 > self.limits.timeout:
                            stop.set()
                        continue
                    if kind == "error":
                        raise value
                    yield kind, value
                    if kind == "done":
                        return
            finally:
                stop.set()

        def result(ans) -> dict:
            sources = [{"n": i, "source": h.source, "heading": h.heading, "text": h.text, "score": h.score}
                       for i, h in enumerate(ans.sources, 1)]
            return {"id": rid, "object": "rag.answer", "created": created, "model": m.name, "collection": name,
                    "answer": ans.text, "found": ans.found, "citations": ans.cited, "sources": sources}

        if body.stream:
            async def stream():
                try:
                    async for kind, value in items():
                        if kind == "text":
                            yield sse({"id": rid, "object": "rag.answer.chunk", "created": created, "delta": value})
                        elif value is not None:
                            yield sse({**result(value), "object": "rag.answer.chunk", "delta": ""})
                except APIError as e:
                    yield sse(e.body())
                yield "data: [DONE]\n\n"
                await worker
            return stream()
        answer = None
        async for kind, value in items():
            if kind == "done":
                answer = value
        await worker
        if answer is None:
            raise APIError(408, "the answer was cancelled", code="cancelled")
        self.metrics.latency.labels(m.name).observe(time.perf_counter() - t0)
        return result(answer)


class _OnDriver:
    """An encoder whose forward passes run on the driving thread (a query's embedding, asked
    for from a worker thread by a collection's search)."""

    def __init__(self, encoder, submit: Callable):
        self._encoder, self._submit = encoder, submit

    def embed(self, texts, *args, **kwargs):
        return self._submit(lambda: self._encoder.embed(texts, *args, **kwargs)).result()

    def __getattr__(self, name):
        return getattr(self._encoder, name)


def _cancel_all(engine, request_ids) -> None:
    for rid in list(request_ids):
        engine.cancel(rid)


class _Stopped(Exception):
    pass


class Call:
    """One API call's engine requests, submitted at once (so that a full queue is seen by the
    next caller); `events()` yields (choice index, event) as they come, cancelling whatever is
    left when the client goes away, the time limit passes, or the consumer stops early (or is
    never started: the requests are cancelled when the call is dropped)."""

    def __init__(self, service: Service, served: Served, requests: list[Request], disconnected: Disconnected,
                 t0: float):
        self.service, self.served, self.requests = service, served, requests
        self.disconnected, self.t0 = disconnected, t0
        self.last: list[Event | None] = [None] * len(requests)
        self.texts: list[list[str]] = [[] for _ in requests]
        self.first_token = False
        self._stop_ids = set(served.lm.tokenizer.stop_ids)
        # events arrive from the engine's thread into a deque; the event loop is woken once per
        # batch (a decoding step's events), not once per token
        self._loop = asyncio.get_running_loop()
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._woken = False
        engine = served.lm.engine
        self._index = {engine.submit(req, self._sink): i for i, req in enumerate(requests)}
        self._left = set(self._index)
        weakref.finalize(self, _cancel_all, engine, self._left)

    def is_stop_token(self, ev: Event) -> bool:
        return ev.finish_reason == "stop" and ev.token in self._stop_ids

    def _sink(self, ev: Event) -> None:  # (the engine's thread)
        self._events.append(ev)
        if not self._woken:
            self._woken = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # (the event loop)
        self._woken = False
        self._ready.set()

    async def _next(self, timeout: float) -> Event | None:
        while not self._events:
            self._ready.clear()
            if self._events:
                break
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._events.popleft()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        engine, left = self.served.lm.engine, self._left
        limits, metrics, name = self.service.limits, self.service.metrics, self.served.name
        timed_out, checked = False, time.perf_counter()
        try:
            while left:
                ev = self._events.popleft() if self._events else await self._next(0.5)
                now = time.perf_counter()
                if ev is None or now - checked > 0.5:  # (twice a second, even while tokens flow)
                    checked = now
                    if await self.disconnected():
                        return
                    if not timed_out and now - self.t0 > limits.timeout:
                        timed_out = True  # (the cancelled events come back and end the requests)
                        for rid in left:
                            engine.cancel(rid)
                    if ev is None:
                        continue
                i = self._index[ev.request_id]
                if ev.finish_reason == "error":
                    raise APIError(500, "the generation failed on the server", type="server_error",
                                   code="generation_failed")
                if ev.finish_reason == "cancelled" and timed_out:
                    ev.finish_reason = "length"  # (the time limit, like the token limit, cut it short)
                if ev.token is not None:
                    if not self.first_token:
                        self.first_token = True
                        metrics.ttft.labels(name).observe(time.perf_counter() - self.t0)
                    metrics.tokens_out(name, 1)
                self.texts[i].append(ev.text)
                if ev.finish_reason is not None:
                    left.discard(ev.request_id)
                    mark_complete(self.requests[i], ev)
                    self.last[i] = ev
                    metrics.prompt_tokens.labels(name).inc(ev.usage.prompt_tokens)
                    metrics.cached_tokens.labels(name).inc(ev.usage.cached_tokens)
                yield i, ev
            metrics.latency.labels(name).observe(time.perf_counter() - self.t0)
        finally:
            _cancel_all(engine, left)

    def usage(self) -> dict:
        # a prompt is read once however many choices continue it (OpenAI counts it once too)
        prompts = {tuple(r.prompt) if r.prompt is not None else id(r): ev.usage.prompt_tokens
                   for r, ev in zip(self.requests, self.last)}
        prompt = sum(prompts.values())
        completion = sum(ev.usage.completion_tokens for ev in self.last)
        cached = sum(ev.usage.cached_tokens for ev in self.last) if len(prompts) == len(self.requests) else \
            min(ev.usage.cached_tokens for ev in self.last)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


# ---- helpers: OpenAI's shapes to lmforge's ---------------------------------------------------------
def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _api(fn, *args):
    """Run fn; lmforge's own errors (bad schema, prompt too long, ...) become 400s."""
    try:
        return fn(*args)
    except LMForgeError as e:
        msg = str(e)
        code = "context_length_exceeded" if "context" in msg and "tokens" in msg else None
        raise APIError(400, msg, code=code) from None


def _ignore_eos(req: Request, ignore: bool) -> None:
    if ignore:
        req.stop_ids = ()


def _finish(reason: str) -> str:
    """OpenAI's finish_reason for lmforge's (a stop string is a "stop"; a cut is a "length")."""
    if reason == "tool_calls":
        return reason
    return "length" if reason in ("length", "cancelled") else "stop"


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise APIError(400, "at most 16 stop sequences", param="stop")
    return [s for s in stops if s]


def _sampling(body) -> dict[str, Any]:
    return dict(temperature=body.temperature, top_p=None if body.top_p >= 1 else body.top_p, top_k=body.top_k,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [prompt]
    return list(prompt)


def chat_messages(messages: list[Message], images: list[bytes] | None = None) -> list[dict]:
    """OpenAI messages as the chat template takes them: text parts joined, "developer" as
    "system", an assistant's tool calls written as the JSON the model was told to emit, and a
    tool's result as a user turn that names the call. image_url parts (data: URIs only; nothing
    is fetched) become images.IMAGE_MARK in the text, their bytes appended to `images`."""
    out = []
    images = [] if images is None else images
    for k, msg in enumerate(messages):
        if isinstance(msg.content, list):
            kinds = {p.type for p in msg.content}
            if kinds - {"text", "image_url"}:
                raise APIError(400, f"messages[{k}]: content of type {', '.join(sorted(kinds - {'text', 'image_url'}))} "
                                    f"is not supported (text and image_url only)", param=f"messages[{k}].content")
            parts = []
            for p in msg.content:
                if p.type == "text":
                    parts.append(p.text or "")
                    continue
                url = p.image_url.get("url") if isinstance(p.image_url, dict) else p.image_url
                if not isinstance(url, str):
                    raise APIError(400, f"messages[{k}]: an image_url part needs a url", param=f"messages[{k}].content")
                try:
                    images.append(decode_data_uri(url))
                except LMForgeError as e:
                    raise APIError(400, f"messages[{k}]: {e}", param=f"messages[{k}].content") from None
                parts.append(IMAGE_MARK)
            text = "".join(parts)
        else:
            text = msg.content or ""
        role = "system" if msg.role == "developer" else msg.role
        if role == "assistant" and msg.tool_calls:
            calls = []
            for c in msg.tool_calls:
                try:
                    args = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError:
                    raise APIError(400, f"messages[{k}]: tool call arguments are not JSON",
                                   param=f"messages[{k}].tool_calls") from None
                calls.append(json.dumps({"name": c.function.name, "arguments": args}, ensure_ascii=False))
            text = (text + "\n" if text else "") + "\n".join(calls)
        if role == "tool":
            role, text = "user", f"Result of the function call{f' {msg.tool_call_id}' if msg.tool_call_id else ''}: {text}"
        out.append({"role": role, "content": text})
    return out


def response_spec(body: ChatRequest) -> Spec | None:
    given = [n for n, v in (("response_format", body.response_format and body.response_format.type != "text"),
                            ("guided_regex", body.guided_regex), ("guided_choice", body.guided_choice)) if v]
    if len(given) > 1:
        raise APIError(400, f"give one of {' and '.join(given)}", param=given[1])
    try:
        if body.guided_regex is not None:
            return Spec.regex(body.guided_regex)
        if body.guided_choice is not None:
            return Spec.choice(body.guided_choice)
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return Spec.any_json()
        if fmt.json_schema is None:
            raise APIError(400, "response_format json_schema needs its json_schema object",
                           param="response_format.json_schema")
        # strict or not, output follows the schema; objects are closed to their listed keys
        # unless the schema says otherwise (as OpenAI's strict mode requires anyway)
        return Spec.json_schema(fmt.json_schema.schema_)
    except LMForgeError as e:
        raise APIError(400, str(e), param="response_format") from None
