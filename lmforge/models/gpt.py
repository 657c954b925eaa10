"""Decoder-only Transformer, GPT-2 or LLaMA flavoured by config.

Design choices:
- pre-norm residual blocks: x + attn(norm(x)), x + mlp(norm(x));
- LayerNorm or RMSNorm; learned absolute positions or rotary embeddings (RoPE);
- causal self-attention through `F.scaled_dot_product_attention`, with grouped-query attention
  (n_kv_head < n_head) handled by the kernel;
- GELU MLP (4x), SwiGLU or GeGLU; tied input/output embeddings by default;
- Gemma 3 options: QK-norm, post-attention/post-MLP norms, scaled embeddings, and
  sliding-window local layers with their own RoPE base interleaved with global layers;
- built on the meta device, then initialised in one place (`init_weights`);
- the KV cache is owned by the caller (the engine) and passed into `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one op instead of six, and no conversions when already in fp32: decoding pays for
        # every op (a Gemma layer has six norms, run once per token). A decoding step's rows
        # (one position per row: (B, 1, C) or (B, nh, 1, hd)) take one C call on CPU, whatever
        # the batch (so a row's numbers do not depend on it); longer inputs keep PyTorch's,
        # whose rounding the reference implementations share
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.dim() >= 2 and x.size(-2) == 1 and (lib := kernels.usable(x)) is not None:
                return kernels.rms_norm(x.contiguous(), self.weight, self.eps, lib)
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # normalise in fp32 for stability under autocast, return in the input dtype
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


# RoPE tables are precomputed up to this many positions and extended on the fly beyond it: a
# 32k-context model would otherwise hold tens of MB of cos/sin tables for positions rarely used
ROPE_TABLE_MAX = 4096


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, head_dim // 2) for rotating pairs (x[i], x[i + hd/2])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (length, hd/2)
    return freqs.cos(), freqs.sin()


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width tables (..., hd/2) -> full-width (cos, signed sin) (..., hd) for apply_rope:
    built once per forward, shared by every layer."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos/sin: (T, hd) from rope_rotation. Rotates the pairs (x[i],
    x[i + hd/2]) (LLaMA/HF layout): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], where
    rolling x by hd/2 gives [x2, x1] and the signed sin supplies the minus."""
    if x.dtype != torch.float32:
        xf = x.float()
        return (xf * cos + torch.roll(xf, x.size(-1) // 2, dims=-1) * sin).type_as(x)
    return x * cos + torch.roll(x, x.size(-1) // 2, dims=-1) * sin  # (B, nh, T, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        if cfg.qk_norm:  # one RMSNorm over head_dim, shared by all heads
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        # q, k and v in one matmul (fewer kernel launches); foreign checkpoints with separate
        # q/k/v projections are concatenated along the output dim when loaded
        self.qkv_proj = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, layer_cache, pos: int,
                mask: torch.Tensor | None = None, causal: bool = True, kv_start: int = 0, last_only: bool = False,
                row_pos: torch.Tensor | None = None, window: int | None = None, probs: list | None = None):
        """mask/causal/kv_start come from GPT.forward, computed once per kind of layer; keys
        before kv_start are out of every query's sliding window and are skipped. With
        last_only, keys and values are made (and cached) for every position but only the last
        position queries: (B, 1, C) out. row_pos: (B,) a decoding step (T == 1) whose rows
        sit at their own positions of their own cache slots. probs: a list to append this
        layer's attention probabilities to (B, nh, T, S), through the explicit reference path."""
        B, T, C = x.size()
        qkv = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)  # (B, T, nh+2nkv, hd)
        q, k, v = qkv.transpose(1, 2).split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        # q: (B, nh, T, hd); k, v: (B, nkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if row_pos is not None and probs is None and kernels.usable(q, self, layer_cache.k):
            # a decoding step: RoPE, the cache write and attention in one C call, each row from
            # its first visible key (its window's start) to its new one
            y = kernels.attn_decode(q, k, v, rope, layer_cache.k, layer_cache.v, layer_cache.slots, row_pos,
                                    window or 0, self.head_dim ** -0.5)  # (B, nh, 1, hd)
            return self.o_proj(y.view(B, 1, self.n_head * self.head_dim))  # (B, 1, C): heads side by side
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if row_pos is not None:
            k, v = layer_cache.update_rows(k, v, row_pos)  # (B, nkv, S, hd), S = longest row + 1
            keys = torch.arange(k.size(2), device=x.device)  # (S,)
            back = row_pos.to(x.device)[:, None] - keys[None, :]  # (B, S) how far each key lies behind
            mask = back >= 0
            if window is not None:
                mask = mask & (back < window)
            mask, causal, kv_start = mask[:, None, None, :], False, 0  # (B, 1, 1, S)
        elif layer_cache is not None:
            k, v = layer_cache.update(k, v, pos)  # (B, nkv, pos + T, hd): everything seen so far
        if probs is not None:  # the reference path: every key, probabilities kept
            y, p = attention_reference(q, k, v, mask, kv_start)
            probs.append(p)
            if last_only and T > 1:
                y, T = y[:, :, -1:], 1
        else:
            if kv_start:
                k, v = k[:, :, kv_start:], v[:, :, kv_start:]  # (B, nkv, S - kv_start, hd)
            if last_only and T > 1:
                q, T = q[:, :, -1:], 1  # (B, nh, 1, hd): the last query sees every key it may
                mask = mask[..., -1:, :] if mask is not None else None
                causal = False
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        kv_start: int):
    """softmax(q k^T / sqrt(hd)) v written out, returning the probabilities too: (B, nh, T, hd)
    and (B, nh, T, S) over every key slot (those a query may not see get 0). q: (B, nh, T, hd);
    k, v: (B, nkv, S, hd). mask: the boolean (.., T, S - kv_start) mask GPT.forward made, or None
    for causal attention with the queries at the end (keys before kv_start out of sight)."""
    B, nh, T, hd = q.shape
    S = k.size(2)
    if mask is None:  # causal: query i (at slot S - T + i) sees keys up to its own slot
        full = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        full[:, :kv_start] = False
    else:
        full = torch.zeros(*mask.shape[:-1], S, dtype=torch.bool, device=q.device)
        full[..., kv_start:] = mask
    group = nh // k.size(1)
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, S, hd)
    scores = (q.float() @ kk.float().transpose(-1, -2)) * hd ** -0.5  # (B, nh, T, S)
    scores = scores.masked_fill(~full, float("-inf"))
    p = scores.softmax(-1)
    return (p @ vv.float()).to(q.dtype), p


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind in ("swiglu", "geglu"):
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.kind == "geglu":
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.local = cfg.is_local(layer)  # sliding-window layer (picks its mask and RoPE table)
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.attn_out_norm = make_norm(cfg)
            self.mlp_out_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, layer_cache, pos, mask=None, causal=True, kv_start=0, last_only=False,
                row_pos=None, window=None, probs=None):
        """last_only: only the last position goes on past attention (the final block of a
        prefill, whose other positions' outputs nobody reads): (B, 1, C) out."""
        a = self.attn(self.attn_norm(x), rope, layer_cache, pos, mask, causal, kv_start, last_only, row_pos, window,
                      probs)
        if self.post_norms:
            a = self.attn_out_norm(a)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = x + (self.drop(a) if self.training else a)  # (no dropout call per layer when decoding)
        m = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            m = self.mlp_out_norm(m)
        return x + (self.drop(m) if self.training else m)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # tables passed in empty: nn.Embedding's own random init is skipped (init_weights does
        # it), and on the meta device that init would import sympy's 70 MB for nothing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd, _weight=torch.empty(cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self._layer_kinds = sorted({b.local for b in self.blocks})  # global (False) and/or local (True)
        self._local_rope = "_local" in self._rope_thetas()
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.pos == "rope":
            self.make_buffers()
        self._plan = None  # the C decoding step's view of the weights (kernels.DecodePlan), made on first use
        self.register_load_state_dict_post_hook(lambda module, _keys: module.invalidate_plan())

    def invalidate_plan(self) -> None:
        """Forget the C decoding step's pointers into the weights: call after replacing modules
        or weight tensors (quantize_model, load_state_dict and .to() do)."""
        self._plan = None

    def _apply(self, fn, recurse=True):
        self.invalidate_plan()
        return super()._apply(fn, recurse)

    def _decode_plan(self, x: torch.Tensor):
        """The C step for this decoding call, or None (kernels unusable, or layers it does not cover)."""
        if self.training or (lib := kernels.usable(x)) is None:
            return None
        if self._plan is None:
            self._plan = kernels.DecodePlan.build(self, lib) or False
        return self._plan or None

    def _rope_thetas(self) -> dict[str, float]:
        """Buffer-name suffix -> RoPE base: one table for global layers, one for local ones."""
        cfg = self.config
        thetas = {"": cfg.rope_theta}
        if cfg.sliding_window is not None and cfg.rope_theta_local not in (None, cfg.rope_theta):
            thetas["_local"] = cfg.rope_theta_local
        return thetas

    def make_buffers(self, device=None) -> None:
        """(Re)allocate the derived RoPE tables; filled by reset_buffers, never saved."""
        n = min(self.config.block_size, ROPE_TABLE_MAX)
        for suffix in self._rope_thetas():
            for kind in ("cos", "sin"):
                self.register_buffer(f"rope_{kind}{suffix}", torch.empty(n, self.config.head_dim // 2, device=device),
                                     persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor (the model may have been built on the meta device).

        | tensor                         | init                                   |
        |--------------------------------|----------------------------------------|
        | embed, pos_embed, Linear       | normal(0, 0.02)                        |
        | o_proj, down_proj (residual)   | normal(0, 0.02 / sqrt(2 * n_layer))    |
        | lm_head (untied)               | normal(0, 0.02)                        |
        | biases                         | zeros                                  |
        | norm weights                   | ones                                   |
        | rope_cos / rope_sin            | computed from rope_theta               |
        """
        cfg = self.config
        if cfg.tie_embeddings:  # to_empty() may have split the shared tensor
            self.lm_head.weight = self.embed.weight
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = resid_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute derived, non-persistent buffers (after loading weights onto an empty model)."""
        if self.config.pos == "rope":
            for suffix, theta in self._rope_thetas().items():
                cos_buf = getattr(self, f"rope_cos{suffix}")
                cos, sin = rope_tables(self.config.head_dim, cos_buf.size(0), theta, device=cos_buf.device)
                cos_buf.copy_(cos)
                getattr(self, f"rope_sin{suffix}").copy_(sin)

    def _rope(self, suffix: str, positions: torch.Tensor, needed: int, batched: bool):
        cos, sin = getattr(self, f"rope_cos{suffix}"), getattr(self, f"rope_sin{suffix}")
        if needed > cos.size(0):
            cos, sin = rope_tables(self.config.head_dim, needed, self._rope_thetas()[suffix], positions.device)
        rope = rope_rotation(cos[positions], sin[positions])  # (T, hd) or (B, T, hd)
        if batched:
            rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, hd): broadcast over heads
        return rope

    @staticmethod
    def _mask(pos: int, T: int, window: int | None, cached: bool, device):
        """(mask, is_causal, kv_start) for one kind of layer over rows at one shared position.
        Query slot s sees key slot k when k <= s and s - k < window (if any); keys before
        kv_start are invisible to every query, so attention skips them."""
        S = pos + T
        windowed = window is not None and S > window  # some query has lost sight of an early key
        if not windowed:
            if not cached or pos == 0:
                return None, True, 0
            if T == 1:
                return None, False, 0
            # a chunk after earlier tokens: query i sees keys 0 .. pos + i
            return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=pos), False, 0
        start = max(0, pos - window + 1)
        if T == 1:
            return None, False, start  # one query: every key from start on is in its window
        slots = torch.arange(pos, S, device=device)  # (T,)
        keys = torch.arange(start, S, device=device)  # (S',)
        back = slots[:, None] - keys[None, :]  # (T, S') how far each key lies behind each query
        return (back >= 0) & (back < window), False, start

    def forward(self, idx: torch.Tensor | None = None, targets: torch.Tensor | None = None, cache=None,
                last_only: bool = False, return_hidden: bool = False, input_embeds: torch.Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                upto: int | None = None):
        """idx: (B, T) token ids, or input_embeds: (B, T, C) vectors in the token table's space
        (what `self.embed(idx)` gives; the embedding scale and positions are applied to both).
        targets: (B, T) next ids or -1 to ignore. cache: a view of the engine's KVCache, or
        None; a single-token step (T == 1) lets every row sit at its own position of its own
        slot, longer inputs need the rows at one shared position. Returns logits (B, T, V) and
        the mean loss; with last_only, logits (B, 1, V) for the last position only (generation
        needs no more, and the output projection over a long prompt is the costliest matmul of
        a prefill). With return_hidden, (final normed states (B, T, C), None) instead.
        output_attentions / output_hidden_states: a third item, a dict with "attentions" (per
        layer (B, nh, T, S) probabilities, from the explicit reference path) and/or
        "hidden_states" (the residual stream entering each layer and the final normed one:
        n_layer + 1 tensors (B, T, C)); the fast path is untouched when neither is asked.
        positions (B, T) and attn_mask (B, T, T), together and without a cache: each token's own
        position and which tokens it sees (instead of 0.. and causal), for packed sequences where
        several continuations share one prefix (sliding windows are applied on top).
        upto (with output_hidden_states): stop at the residual stream entering layer `upto`, the
        last of upto + 1 states returned as (None, None, extras); the deeper layers are not run
        (features from a frozen model's middle layers cost only the layers below them)."""
        if (idx is None) == (input_embeds is None):
            raise ValueError("give token ids or input embeddings, not both or neither")
        if (positions is None) != (attn_mask is None) or (positions is not None and cache is not None):
            raise ValueError("positions and attn_mask go together, and without a cache")
        cfg = self.config
        B, T = idx.size() if idx is not None else input_embeds.shape[:2]
        device = idx.device if idx is not None else input_embeds.device
        row_pos = None
        if cache is not None and T == 1:
            row_pos = cache.row_pos.to(device)  # (B,) each row's own position
            pos = int(row_pos.max())
        else:
            pos = cache.pos if cache is not None else 0
            if pos is None:
                raise ValueError("a forward over several tokens needs its rows at one shared position")
        if cfg.pos == "learned" and pos + T > cfg.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context of {cfg.block_size}")
        packed = positions is not None  # then (B, T), given
        if not packed:
            positions = row_pos[:, None] if row_pos is not None else \
                torch.arange(pos, pos + T, device=device)  # (B, 1) or (T,)
        x = self.embed(idx) if idx is not None else input_embeds.to(self.norm.weight.dtype)  # (B, T, C)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.n_embd)
        if cfg.pos == "learned":
            x = x + self.pos_embed(positions)  # (T, C) broadcast or (B, 1, C)
        # what each kind of layer needs: global layers (False) and sliding-window ones (True)
        ctx = {}
        for local in self._layer_kinds:
            rope = None
            window = cfg.sliding_window if local else None
            if cfg.pos == "rope":
                suffix = "_local" if local and self._local_rope else ""
                rope = self._rope(suffix, positions, int(positions.max()) + 1 if packed else pos + T,
                                  packed or row_pos is not None)
            if packed:
                seen = attn_mask
                if window is not None:
                    back = positions[:, :, None] - positions[:, None, :]  # (B, T, T) key distance behind query
                    seen = seen & (back < window)
                mask = (seen[:, None], False, 0)  # (B, 1, T, T): broadcast over heads
            else:
                mask = (None, False, 0) if row_pos is not None else \
                    self._mask(pos, T, window, cache is not None, device)
            ctx[local] = (rope, *mask, window)
        x = self.drop(x)
        extras: dict = {}
        probs = [] if output_attentions else None
        states = [] if output_hidden_states else None
        if cache is not None and probs is None and states is None and (plan := self._decode_plan(x)) is not None \
                and (row_pos is not None or B * T <= plan.prefill_rows) and pos + T <= min(plan.rope_len, cache.max_len):
            # a decoding step, or a short prompt, through every layer in one C call (the same
            # arithmetic as the modules below, without an interpreter between the operations); a
            # prompt's T positions go in as T rows of one slot at consecutive positions
            if row_pos is not None:
                slots, at = cache.slot_index, row_pos.cpu()  # (B,)
            else:
                slots = cache.slot_index.repeat_interleave(T)  # (B * T,)
                at = torch.arange(pos, pos + T).repeat(B)  # (B * T,)
            x = plan.run(x.reshape(B * T, -1).contiguous(), cache.cache.k, cache.cache.v, slots, at,
                         prefill=row_pos is None).view(B, T, -1)
            cache.advance(T)
            x = self.norm(x[:, -1:] if last_only else x)
            if return_hidden:
                return x, None
            return self.lm_head(x), None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if states is not None:
                states.append(x)
                if i == upto:
                    return None, None, {"hidden_states": states}
            rope, mask, causal, kv_start, window = ctx[block.local]
            x = block(x, rope, cache.layer(i) if cache is not None else None, pos, mask, causal, kv_start,
                      last_only=last_only and i == last, row_pos=row_pos, window=window, probs=probs)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm(x)
        if states is not None:
            extras["hidden_states"] = states + [x]
        if probs is not None:
            extras["attentions"] = probs
        if return_hidden:
            return (x, None, extras) if extras else (x, None)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, extras) if extras else (logits, loss)

    def run_layers(self, x: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
        """The residual stream x (B, T, C) entering layer `start` (positions 0..T-1, causal, no
        cache) through layers start .. stop-1: the states entering layers start .. stop, as
        forward computes them. A classifier that tunes a frozen model's middle layers runs the
        layers below them once, keeps their output, and trains from there."""
        cfg, T = self.config, x.size(1)
        ctx = {}
        for local in self._layer_kinds:
            window = cfg.sliding_window if local else None
            rope = None
            if cfg.pos == "rope":
                suffix = "_local" if local and self._local_rope else ""
                rope = self._rope(suffix, torch.arange(T, device=x.device), T, False)
            ctx[local] = (rope, *self._mask(0, T, window, False, x.device), window)
        states = [x]
        for block in self.blocks[start:stop]:
            rope, mask, causal, kv_start, window = ctx[block.local]
            x = block(x, rope, None, 0, mask, causal, kv_start, window=window)  # (B, T, C)
            states.append(x)
        return states
