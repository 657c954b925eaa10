"""Sampling as small pure functions over logits (B, V) -> (B, V) or ids.
A constraint is one more function of the same shape, so decoding stays composable."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.errors import LMForgeError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    """0 means greedy (argmax)."""
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    """Drop tokens whose probability is below min_p times the top token's."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the context (prompt and output)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output already holds (OpenAI's meaning)."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the output (OpenAI's meaning)."""
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise LMForgeError(f"{name.replace('_', ' ')} must be a finite number, got {v}")
        if self.temperature < 0:
            raise LMForgeError("temperature must be >= 0")
        if self.top_k is not None and self.top_k <= 0:
            raise LMForgeError("top-k must be a positive integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LMForgeError("top-p must be in (0, 1]")
        if self.min_p is not None and not 0.0 <= self.min_p < 1.0:
            raise LMForgeError("min-p must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise LMForgeError("repetition penalty must be positive")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise LMForgeError(f"{name.replace('_', ' ')} must be in [-2, 2]")


def ban_tokens(logits: torch.Tensor, ids) -> torch.Tensor:
    """Make the given token ids impossible (e.g. a char tokenizer's <unk>)."""
    if not ids:
        return logits
    logits = logits.clone()
    logits[..., list(ids)] = float("-inf")
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / max(temperature, 1e-5)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row; the rest become -inf."""
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the mass before it already reaches p (the top token always stays)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Keep tokens with probability >= min_p * (probability of the most likely token)."""
    if not min_p:
        return logits
    probs = logits.softmax(-1)
    keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def repetition_penalty(logits: torch.Tensor, seen_ids, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or not len(seen_ids):
        return logits
    idx = torch.as_tensor(sorted(set(seen_ids)), device=logits.device)
    picked = logits[..., idx]
    logits = logits.clone()
    logits[..., idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def presence_frequency_penalty(logits: torch.Tensor, output_ids, presence: float, frequency: float) -> torch.Tensor:
    """Additive penalties over the tokens generated so far (not the prompt): `presence` once per
    distinct token, `frequency` once per occurrence."""
    if (presence == 0 and frequency == 0) or not len(output_ids):
        return logits
    counts = torch.bincount(torch.as_tensor(output_ids, device=logits.device), minlength=logits.size(-1))
    counts = counts[:logits.size(-1)].to(logits.dtype)  # (V,)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (the first maximum on ties, as torch.argmax). On CPU through
    numpy: PyTorch's CPU argmax takes 0.2 ms over a 262k-token vocabulary, numpy's 0.02 ms."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1), dtype=np.int64))
    return logits.argmax(dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    if params.temperature == 0:
        return greedy(logits)
    logits = apply_temperature(logits.float(), params.temperature)
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
