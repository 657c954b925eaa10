"""Inference state owned by the engine and passed into model.forward.

KVCache: preallocated keys/values for a set of slots, one sequence per slot, each at its own
length, written in place (no per-token torch.cat, so shapes stay static). The engine hands the
model a `CacheView` over the slots of one forward pass; the model calls view.layer(i) for a
layer's tensors and view.advance(T) at the end.
RecurrentSlots: the hidden states of an RNN/GRU/LSTM per slot, the recurrent analogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.config import ModelConfig


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class LayerView:
    """One layer's cache for the rows of a forward pass."""

    def __init__(self, view: "CacheView", i: int):
        self.k, self.v = view.cache.k[i], view.cache.v[i]  # (S, nkv, max_len, hd): every slot
        # (no reference back to the view: a cycle would keep the cache alive until the gc runs)
        self.slots, self.first_slot = view.slot_index, view.first_slot  # (B,) slot of each row

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at one shared position: store (B, nkv, T, hd) at [pos, pos + T) of their slots
        (which must be consecutive); return views of [0, pos + T)."""
        s0, B, T = self.first_slot, k.size(0), k.size(2)
        self.k[s0:s0 + B, :, pos:pos + T] = k
        self.v[s0:s0 + B, :, pos:pos + T] = v
        return self.k[s0:s0 + B, :, :pos + T], self.v[s0:s0 + B, :, :pos + T]

    def update_rows(self, k: torch.Tensor, v: torch.Tensor, row_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row, each at its own position: store (B, nkv, 1, hd) at row_pos[b]
        of row b's slot; return (B, nkv, max(row_pos) + 1, hd) copies of the rows' keys/values."""
        slots = self.slots
        self.k[slots, :, row_pos] = k[:, :, 0]  # (B, nkv, hd): the indexed dims come first
        self.v[slots, :, row_pos] = v[:, :, 0]
        S = int(row_pos.max()) + 1
        return self.k[slots, :, :S], self.v[slots, :, :S]


class CacheView:
    """The slots of one forward pass. pos: the rows' shared length (None when they differ);
    row_pos: (B,) each row's length, where its next token goes."""

    def __init__(self, cache: "KVCache", slots: Sequence[int]):
        self.cache, self.slots = cache, list(slots)
        self.slot_index = torch.tensor(self.slots, dtype=torch.long)
        self.first_slot = self.slots[0]
        self.consecutive = self.slots == list(range(self.first_slot, self.first_slot + len(self.slots)))
        self._layers: list[LayerView] | None = None

    @property
    def pos(self) -> int | None:
        lens = {self.cache.lengths[s] for s in self.slots}
        return lens.pop() if len(lens) == 1 else None

    @property
    def row_pos(self) -> torch.Tensor:
        return torch.tensor([self.cache.lengths[s] for s in self.slots], dtype=torch.long)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def layer(self, i: int) -> LayerView:
        if self._layers is None:
            self._layers = [LayerView(self, j) for j in range(self.cache.k.size(0))]
        return self._layers[i]

    def advance(self, n: int) -> None:
        for s in self.slots:
            self.cache.lengths[s] += n

    def reset(self) -> None:
        for s in self.slots:
            self.cache.lengths[s] = 0


class KVCache:
    """Keys and values of n_slots sequences: (n_layer, n_slots, nkv, max_len, hd) each, with
    every slot's length. `grow` makes room (more slots, longer ones) between forward passes."""

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device, dtype=torch.float32):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        # lengths padded to a multiple of 8 so compiled kernels see few distinct shapes
        self.max_len = _round_up(max(max_len, 1), 8)
        shape = (cfg.n_layer, n_slots, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        self.lengths = [0] * n_slots

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def view(self, slots: Sequence[int]) -> CacheView:
        return CacheView(self, slots)

    def grow(self, n_slots: int, max_len: int) -> None:
        """At least n_slots slots of at least max_len positions, keeping what is cached."""
        n_slots, max_len = max(n_slots, self.n_slots), max(_round_up(max_len, 8), self.max_len)
        if (n_slots, max_len) == (self.n_slots, self.max_len):
            return
        L, S, nkv, old, hd = self.k.shape
        for name in ("k", "v"):
            new = torch.zeros(L, n_slots, nkv, max_len, hd, device=self.device, dtype=self.dtype)
            new[:, :S, :, :old] = getattr(self, name)
            setattr(self, name, new)
        self.lengths += [0] * (n_slots - S)
        self.max_len = max_len

    def bytes_per_token(self) -> int:
        L, _, nkv, _, hd = self.k.shape
        return 2 * L * nkv * hd * self.k.element_size()


class RecurrentState:
    """The hidden state of one batch of rows: tensor (L, B, H), (h, c) for LSTM, or None (zeros)."""

    def __init__(self):
        self.state = None
        self.pos = 0

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.state, self.pos = None, 0


class RecurrentSlots:
    """Per-slot hidden states of a recurrent model; `view(slots)` stacks the rows' states into
    one RecurrentState and `store` splits it back after the forward pass."""

    def __init__(self, n_slots: int = 0):
        self.states: list = [None] * n_slots
        self.lengths = [0] * n_slots

    @property
    def n_slots(self) -> int:
        return len(self.states)

    def grow(self, n_slots: int, max_len: int = 0) -> None:
        extra = max(0, n_slots - self.n_slots)
        self.states += [None] * extra
        self.lengths += [0] * extra

    def view(self, slots: Sequence[int]) -> RecurrentState:
        st = RecurrentState()
        parts = [self.states[s] for s in slots]
        if all(p is None for p in parts):
            return st
        ref = next(p for p in parts if p is not None)
        pair = isinstance(ref, tuple)

        def zeros_like_one(t):
            return torch.zeros_like(t[:, :1])

        def cat(items):
            return torch.cat(items, dim=1)  # (L, B, H)

        if pair:
            st.state = tuple(cat([(p[j] if p is not None else zeros_like_one(ref[j])) for p in parts]) for j in (0, 1))
        else:
            st.state = cat([p if p is not None else zeros_like_one(ref) for p in parts])
        return st

    def store(self, slots: Sequence[int], st: RecurrentState, n: int) -> None:
        for b, s in enumerate(slots):
            if isinstance(st.state, tuple):
                self.states[s] = tuple(t[:, b:b + 1] for t in st.state)
            else:
                self.states[s] = st.state[:, b:b + 1]
            self.lengths[s] += n

    def clear(self, slot: int) -> None:
        self.states[slot], self.lengths[slot] = None, 0

    def bytes_per_token(self) -> int:
        return 0


def make_cache(cfg: ModelConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
    """A cache for `batch_size` rows that advance together (a plain batched forward): a
    KVCache's view over all its slots, or a RecurrentState."""
    if cfg.recurrent:
        return RecurrentState()
    return KVCache(cfg, batch_size, max_len, device, dtype).view(range(batch_size))
