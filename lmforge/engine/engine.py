"""Generation on token ids for many sequences at once.

The engine takes `Request`s (prompt ids or prompt embeddings, sampling parameters, stops,
limits, per-request logits processors) and advances every active one by a token per forward
pass (continuous batching): requests join between steps, a long prompt is prefilled in chunks
between the running sequences' decode steps, and a request leaves when it finishes or is
cancelled, freeing its cache slot. A new request whose prompt starts with what a free slot
already holds reuses those keys and values (prefix reuse). Every step yields structured
`Event`s: the token, its text (through the request's own streaming decoder, so a character is
never split), its log-probability and top alternatives when asked, and at the end the finish
reason and token usage.

The engine never sees a tokenizer: text comes from the decoder object a request carries.
`generate_naive` is the reference path (re-run the whole window every step, no cache) that the
cached path is tested against.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

from lmforge.config import MAX_NEW_TOKENS
from lmforge.engine.cache import KVCache, RecurrentSlots
from lmforge.engine.sampling import SamplingParams, presence_frequency_penalty, repetition_penalty, sample_next
from lmforge.errors import LMForgeError

# A logits processor sees one request's ids so far (prompt and output) and its next-token
# logits (1, V) and returns new logits: banned tokens, penalties and grammar constraints plug in
# here. One that keeps state may also have `accept(token_id)` (told every token the request
# takes) and `finished` (True once the output is complete: the request then stops). One with
# `masks = True` (a constraint, see engine.constraint) is applied after all the others and the
# repetition penalty, and must also answer `allows(token_id)`.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

FINISH_REASONS = ("stop", "length", "stop_string", "cancelled")
log = logging.getLogger("lmforge.engine")


class TextDecoder(Protocol):
    """What a request needs to turn its tokens into text: push(id) -> newly completed text;
    flush() -> whatever is left (tokenizer.StreamDecoder is one)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class Request:
    prompt: Sequence[int] | None = None
    """Prompt token ids."""
    max_new_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: Iterable[int] = ()
    """Token ids that end the request (the stop token is reported, with no text)."""
    stop_strings: Sequence[str] = ()
    """Text that ends the request; the text is cut before it (needs a decoder)."""
    decoder: TextDecoder | None = None
    """Turns tokens into text deltas; without one, events carry no text."""
    logprobs: bool = False
    """Report each token's log-probability under the model (before processors)."""
    top_logprobs: int = 0
    """Also report this many most likely alternatives per step."""
    processors: Sequence[LogitsProcessor] = ()
    embeds: torch.Tensor | None = None
    """(T, C) prompt embeddings in the token table's space, instead of the prompt ids or beside
    them (the same length, one id per row; a negative id marks a row that is no token, e.g. an
    image's vectors): the ids then serve prefix reuse up to the first negative one, penalties
    and processors."""
    id: int = -1
    """Set by the engine when the request is submitted."""

    def __post_init__(self):
        if self.prompt is None and self.embeds is None:
            raise LMForgeError("a request needs prompt ids or prompt embeddings")
        n = len(self.prompt) if self.prompt is not None else int(self.embeds.shape[0])
        if n == 0:
            raise LMForgeError("the prompt is empty: give at least one token")
        if self.embeds is not None and (self.embeds.dim() != 2 or
                                        (self.prompt is not None and len(self.prompt) != self.embeds.size(0))):
            raise LMForgeError("prompt embeddings must be (T, C), one row per prompt id when ids are given too")
        if self.max_new_tokens <= 0:
            raise LMForgeError("max new tokens must be positive")
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise LMForgeError(f"max new tokens must be at most {MAX_NEW_TOKENS:,}, got {self.max_new_tokens:,}")
        if self.top_logprobs < 0:
            raise LMForgeError("top logprobs must be >= 0")
        if self.stop_strings and self.decoder is None:
            raise LMForgeError("stop strings need a decoder (the engine sees token ids only)")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt) if self.prompt is not None else int(self.embeds.shape[0])


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose keys and values were reused from the slot (not computed again)."""


@dataclass
class Event:
    request_id: int
    token: int | None = None
    """The new token (None on an event that only ends the request)."""
    text: str = ""
    """Newly completed text (held back while a stop string may be arriving)."""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    """On the last event: "stop", "length", "stop_string", "cancelled" (or "error", from a
    started engine whose step failed)."""
    usage: Usage | None = None
    """On the last event."""
    error: str | None = None
    """With finish reason "error" (a started engine whose step failed): what went wrong."""
    complete: bool | None = None
    """On the last event of a constrained request (LM.events): whether the output is a whole
    instance of its specification (False: truncated)."""


class _Seq:
    """An admitted request: its slot, its tokens and what it still has to do."""

    def __init__(self, req: Request, slot: int, reused: int, device):
        self.req, self.slot, self.reused = req, slot, reused
        # (placeholders of spliced embeddings are negative: no token for penalties or processors)
        self.ids: list[int] = [i for i in req.prompt if i >= 0] if req.prompt is not None else []
        self.fed = reused  # prompt positions already in the cache
        self.out: list[int] = []
        self.logits: torch.Tensor | None = None  # (1, V) next-token logits, once the prompt is in
        self.next: int | None = None  # a sampled token waiting to be fed
        self.stop = set(req.stop_ids)
        self.pending = ""  # decoded text not yet emitted (a stop string may be arriving)
        self.hold = max((len(s) for s in req.stop_strings if s), default=1) - 1
        p = req.params
        self.gen = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None

    @property
    def prefilling(self) -> bool:
        return self.fed < self.req.prompt_len


class Engine:
    def __init__(self, model: nn.Module, compile: bool = False, max_slots: int = 16, prefill_chunk: int = 256):
        """compile: run the model's forward through torch.compile (dynamic shapes, so the
        growing cache needs no recompiles); the first call compiles for a minute or more on CPU.
        max_slots: sequences decoded together (more wait for a free slot). prefill_chunk:
        prompt tokens per prefill forward, between the running sequences' decode steps."""
        if max_slots < 1 or prefill_chunk < 1:
            raise LMForgeError("max_slots and prefill_chunk must be positive")
        self.model = model.eval()
        self.cfg = model.config
        self.device = next(model.parameters()).device if any(True for _ in model.parameters()) else \
            next(model.buffers()).device
        self.compiled = compile
        self._forward = torch.compile(model.forward, dynamic=True) if compile else model.forward
        self.max_slots, self.prefill_chunk = max_slots, prefill_chunk
        self.cache: KVCache | RecurrentSlots | None = None
        self._slot_tokens: list[list[int] | None] = []  # what each slot's cache holds (for prefix reuse)
        self._free: list[int] = []
        self._waiting: deque[Request] = deque()
        self._active: dict[int, _Seq] = {}  # request id -> sequence, in admission order
        self._cancel: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._sinks: dict[int, Callable[[Event], None]] = {}
        self._driver: Driver | None = None  # the background driver of `start`
        self._wake: threading.Event | None = None  # set by a Driver: the engine is stepped elsewhere
        self.steps = 0

    # ---- requests -------------------------------------------------------------------------
    def submit(self, req: Request, sink: Callable[[Event], None] | None = None) -> int:
        """Queue a request; it joins at the next step with a free slot. Returns its id. sink:
        where a started engine (see `start`) sends the request's events, from its own thread."""
        with self._lock:
            req.id = next(self._ids)
            if sink is not None:
                self._sinks[req.id] = sink
            self._waiting.append(req)
        self._wake_up()
        return req.id

    def cancel(self, request_id: int) -> None:
        """End a request at the next step (finish reason "cancelled"), freeing its slot."""
        with self._lock:
            self._cancel.add(request_id)
        self._wake_up()

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def active(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    def run(self, requests: Iterable[Request]) -> Iterator[Event]:
        """Submit the requests, then step until they have all finished, yielding their events
        as they happen (other requests in the engine advance too). On a started engine, wait
        for the driving thread's events instead. Closing the iterator early cancels the
        requests that have not finished."""
        reqs = list(requests)
        if self._wake is not None:
            return self._run_driven(reqs)
        return self._run_here(reqs)

    def _run_here(self, reqs: list[Request]) -> Iterator[Event]:
        mine = {self.submit(r) for r in reqs}
        try:
            while mine:
                for ev in self.step():
                    if ev.request_id in mine:
                        yield ev
                        if ev.finish_reason is not None:
                            mine.discard(ev.request_id)
        finally:
            for rid in mine:  # (left early: their slots are freed at the next step)
                self.cancel(rid)

    def _run_driven(self, reqs: list[Request]) -> Iterator[Event]:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        mine = {self.submit(r, events.put) for r in reqs}
        try:
            while mine:
                ev = events.get()
                if ev.finish_reason == "error":
                    raise LMForgeError(f"generation failed: {ev.error}")
                yield ev
                if ev.finish_reason is not None:
                    mine.discard(ev.request_id)
        finally:
            for rid in mine:
                self.cancel(rid)

    # ---- driven from another thread (the server) -------------------------------------------
    # A driven engine is stepped by one loop (`Driver`) whenever it has work; requests submitted
    # from any thread advance together, and each one's events go to its sink. The server runs
    # that loop on the main thread: OpenMP (PyTorch's and the C kernels' threads) keeps its
    # workers spinning between the many small parallel regions of a decoding step only while
    # the process has no more OpenMP threads than cores, and a second thread doing parallel work
    # (the first, main one having made its pool at load time) halves decoding speed on 2 cores.
    def start(self) -> None:
        """Drive this engine from a background thread (for tools and tests; the server runs a
        Driver over its engines on the main thread)."""
        if self._driver is None:
            self._driver = Driver([self])
            self._driver.start()

    def stop(self) -> None:
        """Stop the background thread (after its current step); requests in flight stay queued."""
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.stop()

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None:
            wake.set()

    def _pending(self) -> bool:
        return bool(self._waiting or self._active or self._cancel)

    def _drive_step(self) -> None:
        try:
            events = self.step()
        except Exception as e:  # a failed step ends the requests in it, never the loop
            log.exception("engine step failed")
            events = self._fail_all(f"{type(e).__name__}: {e}")
        for ev in events:
            sink = self._sinks.get(ev.request_id)
            if ev.finish_reason is not None:
                with self._lock:
                    self._sinks.pop(ev.request_id, None)
            if sink is not None:
                sink(ev)

    def _fail_all(self, error: str) -> list[Event]:
        """End every request with finish reason "error" and forget what the slots held."""
        events = []
        for seq in list(self._active.values()):
            self._slot_tokens[seq.slot] = None
            self._release(seq)
            events.append(Event(seq.req.id, finish_reason="error", usage=Usage(seq.req.prompt_len, len(seq.out)),
                                error=error))
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        events += [Event(r.id, finish_reason="error", usage=Usage(r.prompt_len, 0), error=error) for r in waiting]
        return events

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One engine step: cancel, admit, sample every sequence whose logits are ready, one
        decode forward for all of them, one prefill chunk. Returns the step's events."""
        events: list[Event] = []
        with self._lock:
            cancelled, self._cancel = self._cancel, set()
        for rid in cancelled:
            if rid in self._active:
                events.append(self._finish(self._active[rid], "cancelled"))
            else:
                for r in list(self._waiting):
                    if r.id == rid:
                        self._waiting.remove(r)
                        events.append(Event(rid, finish_reason="cancelled", usage=Usage(r.prompt_len, 0)))
        self._admit()
        for seq in [s for s in self._active.values() if s.logits is not None and s.next is None]:
            events.extend(self._sample(seq))
        decoding = [s for s in self._active.values() if s.next is not None]
        if decoding:
            self._decode(decoding)
        prefilling = next((s for s in self._active.values() if s.prefilling), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling)
        self.steps += 1
        return events

    # ---- slots ----------------------------------------------------------------------------
    def _ensure_cache(self, n_slots: int, length: int) -> None:
        if self.cache is None:
            self.cache = RecurrentSlots(0) if self.cfg.recurrent else \
                KVCache(self.cfg, 0, max(256, length), self.device)
        old = self.cache.n_slots
        if n_slots > old or (not self.cfg.recurrent and length > self.cache.max_len):
            grow_to = length if self.cfg.recurrent or length <= self.cache.max_len else \
                max(length, 2 * self.cache.max_len)  # doubling: few copies for a long generation
            # slots double (up to max_slots): the grow copies the whole cache, so requests
            # joining one by one cost log2(max_slots) copies instead of one each
            slots = max(n_slots, min(2 * old, self.max_slots)) if n_slots > old else old
            self.cache.grow(slots, grow_to)
            self._slot_tokens += [None] * (self.cache.n_slots - old)
            self._free += list(range(old, self.cache.n_slots))

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_slots:
            with self._lock:
                req = self._waiting.popleft()
            self._ensure_cache(len(self._active) + 1, req.prompt_len + 1)
            slot, reused = self._pick_slot(req)
            self._free.remove(slot)
            if self.cfg.recurrent:
                self.cache.clear(slot)
            else:
                self.cache.lengths[slot] = reused
            self._slot_tokens[slot] = list(req.prompt[:reused]) if reused else []
            self._active[req.id] = _Seq(req, slot, reused, self.device)

    def _pick_slot(self, req: Request) -> tuple[int, int]:
        """The free slot whose cached tokens share the longest prefix with the prompt, and how
        many tokens to reuse (never the whole prompt: its last token must run to give logits)."""
        ctx = self.cfg.context_window
        if req.prompt is None or self.cfg.recurrent or (ctx is not None and req.prompt_len > ctx):
            return self._free[0], 0
        best, best_n = self._free[0], 0
        prompt = req.prompt
        for slot in self._free:
            held = self._slot_tokens[slot] or []
            n = 0
            for a, b in zip(held, prompt):
                if a != b or a < 0:  # a placeholder's vectors (an image) are not known to be the same
                    break
                n += 1
            if n > best_n:
                best, best_n = slot, n
        return best, min(best_n, len(prompt) - 1)

    def _release(self, seq: _Seq) -> None:
        del self._active[seq.req.id]
        self._free.append(seq.slot)
        if self.cfg.recurrent:
            self.cache.clear(seq.slot)

    # ---- forwards -------------------------------------------------------------------------
    def _prefill_chunk(self, seq: _Seq) -> None:
        req = seq.req
        end = min(req.prompt_len, seq.fed + self.prefill_chunk)
        ctx = self.cfg.context_window
        if ctx is not None and req.prompt_len > ctx:  # a learned-position model sees its last ctx tokens only
            seq.fed = max(seq.fed, req.prompt_len - ctx)
            end = min(req.prompt_len, seq.fed + self.prefill_chunk)
        self._ensure_cache(len(self._active), end - seq.fed + self._length(seq.slot))
        if req.embeds is not None:
            kw = {"input_embeds": req.embeds[seq.fed:end][None].to(self.device)}  # (1, T, C)
        else:
            kw = {"idx": torch.tensor([list(req.prompt[seq.fed:end])], dtype=torch.long, device=self.device)}  # (1, T)
        logits = self._run([seq.slot], kw, end - seq.fed)
        if req.prompt is not None:
            self._slot_tokens[seq.slot].extend(req.prompt[seq.fed:end])
        else:
            self._slot_tokens[seq.slot] = None  # embeddings alone: nothing a later prompt can match
        seq.fed = end
        if not seq.prefilling:
            seq.logits = logits[0]  # (1, V)

    def _decode(self, seqs: list[_Seq]) -> None:
        ctx = self.cfg.context_window
        full = [s for s in seqs if ctx is not None and self._length(s.slot) >= ctx]
        rest = [s for s in seqs if s not in full]
        for s in full:  # the window is full: slide it by re-encoding the most recent ctx tokens
            self._set_length(s.slot, 0)
            window = s.ids[-ctx:]
            logits = self._run([s.slot], {"idx": torch.tensor([window], device=self.device)}, ctx)
            self._slot_tokens[s.slot] = list(window)
            s.logits, s.next = logits[0], None
        if rest:
            self._ensure_cache(len(self._active), max(self._length(s.slot) for s in rest) + 1)
            x = torch.tensor([[s.next] for s in rest], dtype=torch.long, device=self.device)  # (B, 1)
            logits = self._run([s.slot for s in rest], {"idx": x}, 1)  # (B, 1, V)
            for b, s in enumerate(rest):
                if self._slot_tokens[s.slot] is not None:
                    self._slot_tokens[s.slot].append(s.next)
                s.logits, s.next = logits[b], None

    def _run(self, slots: list[int], inputs: dict, T: int) -> torch.Tensor:
        if self.cfg.recurrent:
            state = self.cache.view(slots)
            logits = self._forward(cache=state, last_only=True, **inputs)[0]
            self.cache.store(slots, state, T)
            return logits
        return self._forward(cache=self.cache.view(slots), last_only=True, **inputs)[0]  # (B, 1, V)

    def _length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def _set_length(self, slot: int, n: int) -> None:
        self.cache.lengths[slot] = n

    # ---- sampling and events --------------------------------------------------------------
    def _sample(self, seq: _Seq) -> list[Event]:
        req, raw = seq.req, seq.logits  # (1, V)
        logits = raw
        masks = [p for p in req.processors if getattr(p, "masks", False)]
        for proc in req.processors:
            if proc not in masks:
                logits = proc(seq.ids, logits)
        logits = repetition_penalty(logits, seq.ids, req.params.repetition_penalty)
        logits = presence_frequency_penalty(logits, seq.out, req.params.presence_penalty, req.params.frequency_penalty)
        # constraints come last, so that sampling (temperature, top-p, ...) sees the masked
        # distribution; under greedy decoding the model's own argmax is kept when every
        # constraint allows it, and the mask is applied only when one does not
        greedy_tok = int(sample_next(logits, req.params, seq.gen)[0]) if masks and req.params.temperature == 0 else None
        if greedy_tok is not None and all(m.allows(greedy_tok) for m in masks):
            tok = greedy_tok
        else:
            for m in masks:
                logits = m(seq.ids, logits)
            tok = int(sample_next(logits, req.params, seq.gen)[0])
        ev = Event(req.id, tok)
        if req.logprobs or req.top_logprobs:
            lp = raw[0].float().log_softmax(-1)
            ev.logprob = float(lp[tok])
            if req.top_logprobs:
                top = torch.topk(lp, min(req.top_logprobs, lp.numel()))
                ev.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        for proc in req.processors:
            if hasattr(proc, "accept"):
                proc.accept(tok)
        seq.out.append(tok)
        seq.ids.append(tok)
        seq.logits = None
        if tok in seq.stop:
            return [self._finish(seq, "stop", ev)]
        if req.decoder is not None:
            seq.pending += req.decoder.push(tok)
            if req.stop_strings:
                cut = _find_stop(seq.pending, req.stop_strings)
                if cut >= 0:
                    ev.text, seq.pending = seq.pending[:cut], ""
                    return [self._finish(seq, "stop_string", ev, flush=False)]
            if len(seq.pending) > seq.hold:
                n = len(seq.pending) - seq.hold
                ev.text, seq.pending = seq.pending[:n], seq.pending[n:]
        if any(getattr(p, "finished", False) for p in req.processors):
            return [self._finish(seq, "stop", ev)]
        if len(seq.out) >= req.max_new_tokens:
            return [self._finish(seq, "length", ev)]
        seq.next = tok
        return [ev]

    def _finish(self, seq: _Seq, reason: str, ev: Event | None = None, flush: bool = True) -> Event:
        req = seq.req
        ev = ev or Event(req.id)
        if flush and req.decoder is not None and reason != "cancelled":
            rest = seq.pending + req.decoder.flush()
            if req.stop_strings:
                cut = _find_stop(rest, req.stop_strings)
                if cut >= 0:
                    rest, reason = rest[:cut], "stop_string"
            ev.text += rest
        ev.finish_reason = reason
        ev.usage = Usage(req.prompt_len, len(seq.out), seq.reused)
        self._release(seq)
        return ev

    # ---- convenience layers -----------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams | None = None,
                 stop_ids: Sequence[int] = (), processors: Sequence[LogitsProcessor] = (),
                 logprobs: bool = False) -> Iterator[int] | Iterator[tuple[int, float]]:
        """Yield up to max_new_tokens new ids (with logprobs=True: (id, log-probability) pairs);
        stops after yielding a stop id."""
        req = Request(list(prompt_ids), max_new_tokens, params or SamplingParams(), stop_ids,
                      processors=processors, logprobs=logprobs)
        for ev in self.run([req]):
            if ev.token is not None:
                yield (ev.token, ev.logprob) if logprobs else ev.token

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       params: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                       processors: Sequence[LogitsProcessor] = (),
                       row_processors: Sequence[Sequence[LogitsProcessor]] | None = None) -> list[list[int]]:
        """Generate for several prompts at once (one decode forward per step for all of them);
        each row stops on its own (the stop id is included). row_processors: one list per
        prompt, added to the shared ones (e.g. a constraint matcher per row)."""
        if not prompts:
            raise LMForgeError("every prompt needs at least one token")
        if row_processors is not None and len(row_processors) != len(prompts):
            raise LMForgeError("row_processors needs one list per prompt")
        rows = row_processors or [()] * len(prompts)
        reqs = [Request(list(p), max_new_tokens, params or SamplingParams(), stop_ids,
                        processors=[*processors, *extra]) for p, extra in zip(prompts, rows)]
        outs: dict[int, list[int]] = {}
        for ev in self.run(reqs):
            if ev.token is not None:
                outs.setdefault(ev.request_id, []).append(ev.token)
        return [outs.get(r.id, []) for r in reqs]

    @torch.inference_mode()
    def continuation_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                              batch: int = 4) -> list[float]:
        """Sum of log P(continuation | prompt) for each (prompt ids, continuation ids) pair.
        Rows are right-padded (causal attention never looks ahead, so padding after a row's
        tokens changes nothing) and the output projection runs only at the scored positions."""
        out: list[float] = []
        for at in range(0, len(pairs), batch):
            group = [(list(p), list(c)) for p, c in pairs[at:at + batch]]
            if any(not p or not c for p, c in group):
                raise LMForgeError("every prompt and continuation needs at least one token")
            seqs = [p + c for p, c in group]
            longest = max(map(len, seqs))
            x = torch.tensor([s + [0] * (longest - len(s)) for s in seqs], device=self.device)  # (B, L)
            hidden = self.model(x, return_hidden=True)[0]  # (B, L, C)
            for b, (p, c) in enumerate(group):
                h = hidden[b, len(p) - 1:len(p) + len(c) - 1]  # (len(c), C): the states that predict c
                logp = self.model.lm_head(h).float().log_softmax(-1)  # (len(c), V)
                out.append(float(logp.gather(1, torch.tensor(c, device=self.device)[:, None]).sum()))
        return out


class Driver:
    """The loop that steps engines for requests from any thread: it steps every engine that has
    work and sleeps while none has; each engine's `run` then waits for this loop's events
    instead of stepping. It also runs jobs (`submit`) between steps: other work that uses
    OpenMP (an encoder's forward) belongs on this thread too (see Engine.start). Run it on the
    calling thread (`run`, until `halt`) or on a background one (`start` / `stop`)."""

    def __init__(self, engines: Sequence[Engine]):
        self.engines = list(engines)
        self.wake, self._halt = threading.Event(), threading.Event()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _attach(self) -> None:
        for e in self.engines:  # (driven from now on, so that their `run` never steps them itself)
            e._wake = self.wake

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """fn's result, computed on the driving thread between engine steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        self.wake.set()
        return fut

    def run(self) -> None:
        self._attach()
        try:
            while not self._halt.is_set():
                self.wake.clear()  # (before looking: a request submitted after this sets it again)
                busy = False
                while not self._jobs.empty():
                    fn, fut = self._jobs.get_nowait()
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # (handed to whoever waits on the future)
                            fut.set_exception(e)
                    busy = True
                for e in self.engines:
                    if e._pending():
                        e._drive_step()
                        busy = True
                if not busy:
                    self.wake.wait(0.5)
        finally:
            for e in self.engines:
                e._wake = None

    def halt(self) -> None:
        """End `run` after its current step."""
        self._halt.set()
        self.wake.set()

    def start(self) -> None:
        self._attach()  # (before the thread runs: a `run` called right after must not step)
        self._thread = threading.Thread(target=self.run, name="lmforge-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.halt()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _find_stop(text: str, stops: Sequence[str]) -> int:
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def _process(logits: torch.Tensor, ids: list[int], out: list[int], processors: Sequence[LogitsProcessor],
             params: SamplingParams) -> torch.Tensor:
    masks = [p for p in processors if getattr(p, "masks", False)]
    for proc in processors:
        if proc not in masks:
            logits = proc(ids, logits)
    logits = repetition_penalty(logits, ids, params.repetition_penalty)
    logits = presence_frequency_penalty(logits, out, params.presence_penalty, params.frequency_penalty)
    for m in masks:  # (always the full mask here: this is the reference path)
        logits = m(ids, logits)
    return logits


@torch.inference_mode()
def generate_naive(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                   params: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                   processors: Sequence[LogitsProcessor] = ()) -> list[int]:
    """Reference decoding: full forward over the (cropped) sequence for every new token."""
    params = params or SamplingParams()
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    ctx = model.config.context_window
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        window = ids[-ctx:] if ctx else ids
        logits = model(torch.tensor([window], dtype=torch.long, device=device), last_only=True)[0][:, -1]
        nxt = int(sample_next(_process(logits, ids, out, processors, params), params, gen)[0])
        for proc in processors:
            if hasattr(proc, "accept"):
                proc.accept(nxt)
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids or any(getattr(p, "finished", False) for p in processors):
            break
    return out


__all__ = ["Driver", "Engine", "Event", "FINISH_REASONS", "LogitsProcessor", "Request", "TextDecoder", "Usage",
           "generate_naive"]
