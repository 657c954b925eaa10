"""BERT-style encoder (all-MiniLM-L6-v2 and its family).

Post-norm blocks, x = norm(x + attn(x)), x = norm(x + mlp(x)); learned absolute positions plus
token-type embeddings, normalised once before the first block; bidirectional attention that
masks padding keys only; exact (erf) GELU. Built on meta, then `init_weights`, like GPT.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import EncoderConfig


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v fused; loaded from three tensors
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd)
        self.mlp_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = self.attn_norm(x + self.o_proj(y))
        return self.mlp_norm(x + self.down_proj(F.gelu(self.up_proj(x))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        # tables passed in empty: init_weights fills them (see GPT for why)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.n_embd, _weight=torch.empty(cfg.max_len, cfg.n_embd))
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.n_embd,
                                       _weight=torch.empty(cfg.type_vocab_size, cfg.n_embd))
        self.embed_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, 0.02) for embeddings and linears, zero biases, unit norms (BERT's recipe)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) ids; attention_mask: (B, T), 1 for real tokens, 0 for padding.
        Returns the last hidden states (B, T, C)."""
        B, T = idx.shape
        if T > self.config.max_len:
            raise ValueError(f"input of {T} tokens exceeds the encoder's {self.config.max_len} positions")
        pos = torch.arange(T, device=idx.device)
        types = token_types if token_types is not None else torch.zeros_like(idx)
        x = self.embed_norm(self.embed(idx) + self.pos_embed(pos) + self.type_embed(types))  # (B, T, C)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padded keys are invisible
        for block in self.blocks:
            x = block(x, mask)
        return x


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' states: (B, T, C), (B, T) -> (B, C)."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def last_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state of each row's last real token (right-padded rows): what a causal model has read
    the whole text by."""
    last = attention_mask.sum(1).clamp(min=1) - 1  # (B,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


POOLING = {"mean": mean_pool, "cls": cls_pool, "last": last_pool}
__all__ = ["BertEncoder", "EncoderBlock", "POOLING", "cls_pool", "last_pool", "mean_pool"]
