"""Generation on token ids: prefill once, then decode one token at a time against the cache.

The engine never sees text. `generate_naive` is the reference path (re-run the whole window
every step, no cache) that the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from lmforge.engine.cache import make_cache
from lmforge.engine.sampling import SamplingParams, repetition_penalty, sample_next

# A logits processor sees the ids so far and the next-token logits (B, V) and returns new logits:
# banned tokens, repetition penalties and grammar constraints all plug in here.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def _process(logits: torch.Tensor, ids: list[int], processors: Sequence[LogitsProcessor],
             params: SamplingParams) -> torch.Tensor:
    for proc in processors:
        logits = proc(ids, logits)
    return repetition_penalty(logits, ids, params.repetition_penalty)
from lmforge.errors import LMForgeError


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class Engine:
    def __init__(self, model: nn.Module, compile: bool = False):
        """compile: run the model's forward through torch.compile (dynamic shapes, so the
        growing cache needs no recompiles). Elementwise work between the matmuls is fused; the
        first call compiles for a minute or more on CPU (inductor caches it on disk after)."""
        self.model = model.eval()
        self.cfg = model.config
        self.device = _device_of(model)
        self.compiled = compile
        self._forward = torch.compile(model.forward, dynamic=True) if compile else model.forward

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams | None = None,
                 stop_ids: Sequence[int] = (), processors: Sequence[LogitsProcessor] = (),
                 logprobs: bool = False) -> Iterator[int] | Iterator[tuple[int, float]]:
        """Yield up to max_new_tokens new ids (with logprobs=True: (id, log-probability under the
        model's unmodified distribution) pairs); stops after yielding a stop id."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise LMForgeError("the prompt is empty: give at least one token")
        ctx = self.model.max_context
        ids = list(prompt_ids)
        cache_len = len(ids) + max_new_tokens if ctx is None else min(ctx, len(ids) + max_new_tokens)
        cache = make_cache(self.cfg, 1, cache_len, self.device)
        gen = _generator(params.seed, self.device)
        stop = set(stop_ids)

        def prefill(window: list[int]) -> torch.Tensor:
            cache.reset()
            x = torch.tensor([window], dtype=torch.long, device=self.device)  # (1, T)
            return self._forward(x, cache=cache, last_only=True)[0][:, -1]  # (1, V)

        logits = prefill(ids[-ctx:] if ctx else ids)
        for _ in range(max_new_tokens):
            nxt = int(sample_next(_process(logits, ids, processors, params), params, gen)[0])
            yield (nxt, float(logits[0].float().log_softmax(-1)[nxt])) if logprobs else nxt
            ids.append(nxt)
            if nxt in stop:
                return
            if ctx is not None and cache.pos >= ctx:
                # the window is full: slide it by re-encoding the most recent ctx tokens
                logits = prefill(ids[-ctx:])
            else:
                x = torch.tensor([[nxt]], dtype=torch.long, device=self.device)  # (1, 1)
                logits = self._forward(x, cache=cache, last_only=True)[0][:, -1]


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

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       params: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                       processors: Sequence[LogitsProcessor] = ()) -> list[list[int]]:
        """Generate for several prompts at once: one forward per step for the whole batch.
        Prompts are left-padded to one length; each row keeps its own positions and never
        attends to padding. Rows stop independently (the stop id is included)."""
        params = params or SamplingParams()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LMForgeError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        ctx = self.model.max_context
        if self.cfg.recurrent or (ctx is not None and longest + max_new_tokens > ctx):
            # recurrent state would absorb the padding; a full learned-position window must slide
            return [list(self.generate(p, max_new_tokens, params, stop_ids, processors)) for p in prompts]
        B = len(prompts)
        cache = make_cache(self.cfg, B, longest + max_new_tokens, self.device)
        cache.pad = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        x = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=self.device)  # (B, L)
        logits = self._forward(x, cache=cache, last_only=True)[0][:, -1]  # (B, V)
        gen = _generator(params.seed, self.device)
        stop = set(stop_ids)
        seqs = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        done = [False] * B
        for _ in range(max_new_tokens):
            rows = [_process(logits[b:b + 1], seqs[b], processors, params) for b in range(B)]
            nxt = sample_next(torch.cat(rows), params, gen).tolist()  # (B,)
            for b, t in enumerate(nxt):
                if not done[b]:
                    outs[b].append(t)
                    seqs[b].append(t)
                    done[b] = t in stop
            if all(done):
                break
            step = torch.tensor([[t] for t in nxt], device=self.device)  # (B, 1)
            logits = self._forward(step, cache=cache, last_only=True)[0][:, -1]
        return outs


@torch.inference_mode()
def generate_naive(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                   params: SamplingParams | None = None, stop_ids: Sequence[int] = (),
                   processors: Sequence[LogitsProcessor] = ()) -> list[int]:
    """Reference decoding: full forward over the (cropped) sequence for every new token."""
    params = params or SamplingParams()
    model.eval()
    device = _device_of(model)
    gen = _generator(params.seed, device)
    ctx = model.max_context
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        window = ids[-ctx:] if ctx else ids
        logits = model(torch.tensor([window], dtype=torch.long, device=device), last_only=True)[0][:, -1]
        nxt = int(sample_next(_process(logits, ids, processors, params), params, gen)[0])
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out
