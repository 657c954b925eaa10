"""lmforge checkpoints: a folder of readable JSON beside safetensors, never pickle.

    config.json            format tag, model config, train config, step, metrics
    model.safetensors      weights (a tied output projection is stored once)
    tokenizer.json         the tokenizer, in the `tokenizers` library's format
    optimizer.safetensors  optimizer moments (training checkpoints only)
    trainer_state.json     step, optimizer param groups, scaler state (training checkpoints only)

A training run keeps numbered checkpoints under run/checkpoints/step_NNNNNNN and a `latest`
file naming the newest; every checkpoint folder is written under a temporary name and renamed
into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.common import atomic_dir, atomic_write_text
from lmforge.config import ModelConfig, TrainConfig, load_json
from lmforge.errors import LMForgeError
from lmforge.models import build_model

FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    model_config: ModelConfig
    train_config: TrainConfig | None
    step: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def has_optimizer(self) -> bool:
        return (self.path / "optimizer.safetensors").is_file() and (self.path / "trainer_state.json").is_file()


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # same storage as embed.weight
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(path: Path, model: nn.Module, *, step: int, tokenizer_json: str,
                    train_config: TrainConfig | None = None, meta: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    trainer_state: dict[str, Any] | None = None, tokenizer_extra: dict | None = None) -> Path:
    """tokenizer_extra: what tokenizer.json cannot hold (LMTokenizer.saved_extra(): a chat
    template, BOS, stop ids), written beside it as tokenizer_extra.json, where the loader looks."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        cfg = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "train": train_config.to_dict() if train_config else None,
            "step": step,
            "meta": meta or {},
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file(_model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        if tokenizer_extra is not None:
            (tmp / "tokenizer_extra.json").write_text(json.dumps(tokenizer_extra, indent=2) + "\n", encoding="utf-8")
        if optimizer is not None:
            tensors, rest = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = dict(trainer_state or {}, step=step, optimizer=rest)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return path


def resolve(path: Path | str) -> Path:
    """A checkpoint folder, or a run folder whose `latest` file names one."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"no such checkpoint or run folder: {path}")
    if path.is_file():
        raise LMForgeError(f"{path} is a file; give the checkpoint folder (with config.json and model.safetensors)")
    latest = path / "latest"
    if latest.is_file() and not (path / "config.json").exists():
        target = path / latest.read_text(encoding="utf-8").strip()
        if not target.is_dir():
            raise LMForgeError(f"{latest} points to {target}, which does not exist")
        return target
    return path


def read_checkpoint(path: Path | str) -> Checkpoint:
    path = resolve(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LMForgeError(f"{path} is not an lmforge checkpoint (no config.json)")
    cfg = load_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise LMForgeError(f"{path} is not an lmforge checkpoint (config.json has no lmforge format tag)")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise LMForgeError(f"{path} was written by a newer lmforge (format {cfg['format_version']})")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise LMForgeError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
        train_cfg = TrainConfig.from_dict(cfg["train"]) if cfg.get("train") else None
    except (KeyError, TypeError) as e:
        raise LMForgeError(f"checkpoint {path} has a malformed config.json ({e})") from None
    return Checkpoint(path, model_cfg, train_cfg, int(cfg.get("step", 0)), cfg.get("meta") or {})


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise LMForgeError(f"{file} is corrupt or not a safetensors file ({e})") from None


def load_model(ckpt: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    model = build_model(ckpt.model_config, device=device, init=False)
    tensors = _load_tensors(ckpt.path / "model.safetensors")
    expected = _model_tensors_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LMForgeError(f"checkpoint {ckpt.path} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for k, t in tensors.items():
        if tuple(t.shape) != expected[k]:
            raise LMForgeError(f"checkpoint {ckpt.path}: {k} has shape {tuple(t.shape)}, config says {expected[k]}")
    model.load_state_dict(tensors, strict=False)
    if ckpt.model_config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_buffers()
    return model


def _model_tensors_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in sd.items()}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as safetensors-ready tensors plus JSON-ready rest (no pickle)."""
    return _optimizer_tensors(opt)


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any],
                      where: Path) -> None:
    """The inverse of optimizer_tensors."""
    opt_state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = t
    for key, v in rest["scalars"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    try:
        opt.load_state_dict({"state": opt_state, "param_groups": rest["param_groups"]})
    except (ValueError, KeyError) as e:
        raise LMForgeError(f"optimizer state in {where} does not fit this model ({e})") from None


def load_optimizer_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer moments and return the trainer state (step, scaler, ...)."""
    if not ckpt.has_optimizer:
        raise LMForgeError(f"checkpoint {ckpt.path} has no optimizer state, so it cannot be resumed")
    state = load_json(ckpt.path / "trainer_state.json")
    restore_optimizer(optimizer, _load_tensors(ckpt.path / "optimizer.safetensors"), state["optimizer"], ckpt.path)
    return state


def write_latest(run_dir: Path, ckpt_dir: Path) -> None:
    atomic_write_text(run_dir / "latest", str(ckpt_dir.relative_to(run_dir)) + "\n")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` numbered checkpoints (never the one `latest` names)."""
    if keep <= 0:
        return
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    current = resolve(run_dir)
    for old in steps[:-keep]:
        if old.resolve() != current.resolve():
            shutil.rmtree(old, ignore_errors=True)
