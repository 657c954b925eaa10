"""A quantized copy of a pulled model, kept in the store beside its GGUF.

Reading a GGUF means parsing a large vocabulary and converting every tensor; the quantized copy
is one safetensors file that loads straight into the quantized model, so later loads are fast
and never hold a float copy of the weights. It records the sha256 of the GGUF it came from and
the layout (which module is int8, which int4), and is rebuilt when either no longer fits.

Loading reads each tensor into its own fresh allocation with plain file reads rather than a
memory map: mapped pages count towards the process's resident memory until the map closes, so
a mapped load peaks at twice the model's size, and the int4/int8 kernels need aligned storage.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.common import sha256_file
from lmforge.config import ModelConfig
from lmforge.models import GPT
from lmforge.models.quant import build_quantized_skeleton, quant_layout, retie

WEIGHTS, CONFIG = "int8.safetensors", "int8.json"
FORMAT = 6  # bumped when the layout of the cache changes; older caches are rebuilt

_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16,
           "F32": torch.float32, "I32": torch.int32, "I64": torch.int64}


def save_quantized(folder: Path, model: nn.Module, source_sha256: str) -> None:
    # a tied head holds no tensors of its own, so the table is saved once
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(sd, str(tmp), metadata={"source_sha256": source_sha256})
    weights_sha = sha256_file(tmp)
    os.replace(tmp, folder / WEIGHTS)
    meta = {"format": FORMAT, "model": model.config.to_dict(), "layout": quant_layout(model),
            "source_sha256": source_sha256, "weights_sha256": weights_sha}
    cfg_tmp = folder / f".{CONFIG}.tmp-{os.getpid()}"
    cfg_tmp.write_text(json.dumps(meta, indent=2))
    os.replace(cfg_tmp, folder / CONFIG)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a safetensors file, each read into its own new tensor (no memory map),
    and the sha256 of the whole file, hashed from the same bytes as they are read (one pass)."""
    import hashlib

    h = hashlib.sha256()
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n)
        h.update(head + raw)
        header = json.loads(raw)
        pos = 0  # in the data section, as read so far
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):  # in file order
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            if end - start != t.numel() * t.element_size() or start < pos:
                raise ValueError(f"{name}: size or offset does not match its shape")
            h.update(f.read(start - pos))  # (padding between tensors, if any)
            if t.numel():
                buf = t.view(-1).view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.view(-1).numpy()
                if f.readinto(memoryview(buf)) != end - start:
                    raise ValueError(f"{name}: file is truncated")
                h.update(memoryview(buf))
            pos = end
            out[name] = t
        while chunk := f.read(1 << 22):  # anything after the last tensor counts too
            h.update(chunk)
    return out, h.hexdigest()


def assemble(cfg: ModelConfig, layout: dict[str, str], state: dict[str, torch.Tensor], device,
             source: str = "") -> nn.Module:
    """A quantized GPT from its layout and state (no float weights are ever allocated)."""
    from lmforge.errors import LMForgeError

    model = build_quantized_skeleton(GPT, cfg, layout)
    state = {k: v.to(device) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise LMForgeError(f"{source}: quantized weights do not fit the model ({str(e).splitlines()[0]})") from None
    retie(model)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and not n.startswith("rope_")]
    if missing:
        raise LMForgeError(f"{source}: tensors missing for {missing[:4]}")
    if cfg.pos == "rope":
        model.make_buffers(device)
    model.reset_buffers()
    return model.eval()


def load_quantized(folder: Path, source_sha256: str, device) -> nn.Module | None:
    """The cached quantized model, or None when there is none, it belongs to another file, or
    it is damaged (the caller then rebuilds it from the GGUF)."""
    from lmforge.errors import LMForgeError

    wpath, cpath = folder / WEIGHTS, folder / CONFIG
    if not (wpath.is_file() and cpath.is_file()):
        return None
    try:
        meta = json.loads(cpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # damaged: rebuilt from the GGUF
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("source_sha256") != source_sha256:
        return None  # from another lmforge version or another file
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        state, digest = read_safetensors(wpath)
        if meta.get("weights_sha256") != digest:
            return None  # the copy was damaged or edited since it was written
        return assemble(cfg, meta["layout"], state, device, source=str(wpath))
    except (KeyError, ValueError, OSError, struct.error, json.JSONDecodeError, LMForgeError):
        # what a damaged header or a format mismatch can raise (a bug elsewhere still surfaces)
        return None
