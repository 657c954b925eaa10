"""A converted int8 copy of a pulled model, kept in the store beside its GGUF.

Reading a GGUF means parsing ~100k vocabulary entries and dequantizing every tensor; the int8
copy is one safetensors file that loads straight into an int8 model, so later loads are fast
and never hold a float32 copy of the weights. It records the sha256 of the GGUF it came from
and is rebuilt when that no longer matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.config import ModelConfig
from lmforge.models import GPT
from lmforge.models.quant import build_int8_skeleton

WEIGHTS, CONFIG = "int8.safetensors", "int8.json"


def save_int8(folder: Path, model: nn.Module, source_sha256: str) -> None:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(sd, str(tmp), metadata={"source_sha256": source_sha256})
    os.replace(tmp, folder / WEIGHTS)
    cfg_tmp = folder / f".{CONFIG}.tmp-{os.getpid()}"
    cfg_tmp.write_text(json.dumps({"model": model.config.to_dict(), "source_sha256": source_sha256}, indent=2))
    os.replace(cfg_tmp, folder / CONFIG)


def load_int8(folder: Path, source_sha256: str, device) -> nn.Module | None:
    """The cached int8 model, or None when there is none or it belongs to another file."""
    wpath, cpath = folder / WEIGHTS, folder / CONFIG
    if not (wpath.is_file() and cpath.is_file()):
        return None
    try:
        meta = json.loads(cpath.read_text(encoding="utf-8"))
        if meta.get("source_sha256") != source_sha256:
            return None
        cfg = ModelConfig.from_dict(meta["model"])
        # one tensor at a time, each copied into a fresh allocation: the int8 kernel needs better
        # alignment than file offsets give, and this way only one extra tensor is alive at a time
        tensors = {}
        with safe_open(str(wpath), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key).clone()
    except (json.JSONDecodeError, KeyError, SafetensorError, OSError):
        return None  # a damaged cache is rebuilt from the GGUF
    model = build_int8_skeleton(GPT, cfg)
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError:
        return None
    if any(t.is_meta for t in model.parameters()) or any(
            b.is_meta for n, b in model.named_buffers() if not n.startswith("rope_")):
        return None
    if cfg.pos == "rope":
        model.make_buffers(device)
    model.reset_buffers()
    return model.eval()
