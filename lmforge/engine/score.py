"""Validation metrics: loss (nats/token), perplexity and bits per byte.

Bits per byte divides the summed negative log-likelihood by the UTF-8 bytes the predicted
tokens stand for, so char- and BPE-level models are compared on the same scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import autocast


@dataclass
class EvalResult:
    loss: float
    tokens: int
    bytes: int
    nats: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bpb(self) -> float:
        return self.nats / (math.log(2) * max(self.bytes, 1))

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}ppl": self.perplexity, f"{prefix}bpb": self.bpb,
                f"{prefix}tokens": self.tokens}


class Accumulator:
    """Sums (nats, tokens, bytes) over batches; reduce() merges the sums across processes."""

    def __init__(self, token_bytes: np.ndarray, device: torch.device):
        self.token_bytes = torch.as_tensor(token_bytes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
        self.sums[0] += nll.double()
        self.sums[1] += y.numel()
        self.sums[2] += self.token_bytes[y.reshape(-1)].sum()

    def reduce(self, world_size: int = 1) -> EvalResult:
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(self.sums)
        nats, tokens, nbytes = self.sums.tolist()
        return EvalResult(loss=nats / max(tokens, 1), tokens=int(tokens), bytes=int(nbytes), nats=nats)


@torch.no_grad()
def evaluate_windows(model: nn.Module, ids: np.ndarray, token_bytes: np.ndarray, block_size: int,
                     batch_size: int, device: torch.device, dtype=torch.float32, progress=None) -> EvalResult:
    """Score every token of `ids` (except the first) with non-overlapping windows of block_size.
    Recurrent models carry their hidden state across windows, so they see the whole history."""
    model.eval()
    acc = Accumulator(token_bytes, device)
    n = len(ids) - 1
    n_windows = max(1, math.ceil(n / block_size))
    recurrent = model.config.recurrent
    if recurrent:
        from lmforge.engine.cache import RecurrentState

        state = RecurrentState()
        batch_size = 1  # one stream, in order
    for w0 in range(0, n_windows, batch_size):
        xs, ys = [], []
        for w in range(w0, min(w0 + batch_size, n_windows)):
            s = w * block_size
            e = min(s + block_size, n)
            xs.append(torch.from_numpy(np.asarray(ids[s:e], dtype=np.int64)))
            ys.append(torch.from_numpy(np.asarray(ids[s + 1:e + 1], dtype=np.int64)))
        if len(xs) > 1 and len(xs[-1]) != len(xs[0]):  # the short tail window goes in a batch of its own
            tail = (xs.pop(), ys.pop())
        else:
            tail = None
        for bx, by in [(torch.stack(xs), torch.stack(ys))] + ([(tail[0][None], tail[1][None])] if tail else []):
            bx, by = bx.to(device), by.to(device)
            with autocast(device, dtype):
                logits, _ = model(bx, cache=state if recurrent else None)
            acc.add(logits, by)
        if progress is not None:
            progress(min(w0 + batch_size, n_windows), n_windows)
    return acc.reduce()
