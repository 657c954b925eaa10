"""Inference state owned by the engine and passed into model.forward.

KVCache: preallocated keys/values for every layer, written in place (no per-token torch.cat,
so shapes stay static); the model calls layer(i).update(k, v, pos) and advance(T).
RecurrentState: the hidden state of an RNN/GRU/LSTM, the recurrent analogue of a KV cache.
"""

from __future__ import annotations

import weakref

import torch

from lmforge.config import ModelConfig


class LayerKV:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, owner: "KVCache"):
        self.k, self.v = k, v  # (B, nkv, max_len, hd)
        self._owner = weakref.ref(owner)  # (a strong one would make a cycle: freed only by the gc)

    @property
    def pad(self) -> torch.Tensor | None:
        """(B,) left padding per row of the whole cache (None when no row is padded)."""
        owner = self._owner()
        return owner.pad if owner is not None else None

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nkv, T, hd) new keys/values at [pos, pos + T); return views of [0, pos + T)."""
        T = k.size(2)
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        # pad to a multiple of 8 so compiled kernels see few distinct shapes
        self.max_len = (max_len + 7) // 8 * 8
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._layers = [LayerKV(self.k[i], self.v[i], self) for i in range(cfg.n_layer)]
        self.pos = 0
        self.pad: torch.Tensor | None = None  # (B,) left padding per row, for batches of unequal prompts

    def layer(self, i: int) -> LayerKV:
        return self._layers[i]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class RecurrentState:
    def __init__(self):
        self.state = None  # tensor (L, B, H) or (h, c) for LSTM; None means zeros
        self.pos = 0

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.state, self.pos = None, 0


def make_cache(cfg: ModelConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
    if cfg.recurrent:
        return RecurrentState()
    return KVCache(cfg, batch_size, max_len, device, dtype)
