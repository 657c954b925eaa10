"""Model registry: config.family -> module class. Models import only torch and lmforge.config."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.models.gpt import GPT
from lmforge.models.rnn import RecurrentLM

_REGISTRY: dict[str, type[nn.Module]] = {"gpt": GPT, "rnn": RecurrentLM, "gru": RecurrentLM, "lstm": RecurrentLM}


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", init: bool = True) -> nn.Module:
    """Construct on the meta device (no memory, no wasted init), then materialise on `device`.
    With init=False the tensors are left uninitialised for a checkpoint to fill."""
    with torch.device("meta"):
        model = _REGISTRY[cfg.family](cfg)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_embeddings and name.split(".")[0] in ("embed", "pos_embed"):
            continue
        n += p.numel()
    return n


__all__ = ["GPT", "RecurrentLM", "build_model", "count_params"]
