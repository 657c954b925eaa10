"""Recurrent language models: vanilla RNN (tanh), GRU and LSTM.

All three share one skeleton: embedding -> stacked recurrent layers (PyTorch's fused
nn.RNN / nn.GRU / nn.LSTM) -> LayerNorm -> output projection tied to the embedding.
The hidden state is the recurrent analogue of a KV cache: the engine owns a
RecurrentState and passes it in; the model reads it and stores the new state back.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig

_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))  # init_weights fills it
        kwargs = dict(nonlinearity="tanh") if cfg.family == "rnn" else {}
        self.rnn = _CELLS[cfg.family](cfg.n_embd, cfg.n_embd, num_layers=cfg.n_layer, batch_first=True,
                                      dropout=cfg.dropout if cfg.n_layer > 1 else 0.0, **kwargs)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """| tensor            | init                                  |
        |-------------------|---------------------------------------|
        | embed (= lm_head) | normal(0, 0.02)                       |
        | lm_head (untied)  | normal(0, 0.02)                       |
        | recurrent weights | uniform(-1/sqrt(H), 1/sqrt(H))        |
        | recurrent biases  | zeros; LSTM forget-gate bias ones     |
        | norm              | ones / zeros                          |
        """
        cfg = self.config
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        bound = 1.0 / math.sqrt(cfg.n_embd)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -bound, bound)
            else:
                nn.init.zeros_(p)
                if cfg.family == "lstm" and name.startswith("bias_ih"):
                    # gates are ordered (input, forget, cell, output): start by remembering
                    p[cfg.n_embd:2 * cfg.n_embd].fill_(1.0)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        self.rnn.flatten_parameters()

    def reset_buffers(self) -> None:
        self.rnn.flatten_parameters()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None, last_only: bool = False,
                return_hidden: bool = False):
        """idx: (B, T); targets: (B, T) or None; cache: RecurrentState or None.
        Returns logits (B, T, V) and the mean loss; with return_hidden, the final normed states
        (B, T, C) and None (for heads other than the LM head)."""
        x = self.drop(self.embed(idx))  # (B, T, C)
        h0 = cache.state if cache is not None else None  # (L, B, C) or a pair of them for LSTM
        y, h = self.rnn(x, h0)  # y: (B, T, C)
        if cache is not None:
            cache.state = h
            cache.advance(idx.size(1))
        if last_only:
            y = y[:, -1:]  # (B, 1, C)
        if return_hidden:
            return self.norm(self.drop(y)), None
        logits = self.lm_head(self.norm(self.drop(y)))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss
