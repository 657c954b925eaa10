"""Typed configuration for models and training, plus named presets.

This module must stay importable without torch: the CLI reads presets and checkpoints'
config.json with it, and later layers (models, trainer) build from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError


def home() -> Path:
    """lmforge's folder for pulled models, collections and built kernels: $LMFORGE_HOME, or the
    user's cache folder."""
    env = os.environ.get("LMFORGE_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lmforge"))

FAMILIES = ("rnn", "gru", "lstm", "gpt")
RECURRENT_FAMILIES = ("rnn", "gru", "lstm")


@dataclass
class ModelConfig:
    """Architecture of a language model. One config type for every family."""

    family: str = "gpt"
    """Model family: rnn (tanh), gru, lstm or gpt (decoder Transformer)."""
    vocab_size: int = 256
    """Number of token ids; set from the tokenizer when training."""
    block_size: int = 256
    """Training context length in tokens (the Transformer's maximum context)."""
    n_layer: int = 4
    """Stacked recurrent layers or Transformer blocks."""
    n_embd: int = 128
    """Embedding width; also the hidden size of the recurrent families."""
    n_head: int = 4
    """Attention heads (gpt only)."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention (gpt only); None means n_head."""
    mlp_hidden: int | None = None
    """Hidden width of the feed-forward block (gpt only); None means 4 * n_embd."""
    norm: str = "layernorm"
    """layernorm or rmsnorm (gpt only; the recurrent families use layernorm)."""
    pos: str = "learned"
    """Positional scheme for gpt: learned absolute embeddings or rope."""
    mlp: str = "gelu"
    """Feed-forward type for gpt: gelu (GPT-2), swiglu (LLaMA) or geglu (Gemma: tanh-GELU gate)."""
    bias: bool = False
    """Biases in linear layers and norms (gpt only)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    dropout: float = 0.0
    # --- Gemma-3-style options (gpt only); the defaults give GPT-2 / LLaMA blocks
    head_size: int | None = None
    """Width of one attention head; None means n_embd // n_head (Gemma 3 sets it apart)."""
    qk_norm: bool = False
    """RMS-normalise each query and key head before RoPE."""
    post_norms: bool = False
    """Also normalise the attention and MLP outputs before they join the residual stream."""
    embed_scale: bool = False
    """Multiply input embeddings by sqrt(n_embd)."""
    sliding_window: int | None = None
    """Local layers attend to at most this many most recent tokens (themselves included)."""
    global_every: int = 0
    """With a sliding window, every global_every-th layer attends globally (0: all local)."""
    rope_theta_local: float | None = None
    """RoPE base of the sliding-window layers; None means rope_theta."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise LMForgeError(f"unknown model family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head"):
            if getattr(self, name) <= 0:
                raise LMForgeError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head <= 0:
            raise LMForgeError(f"model config: n_kv_head must be positive, got {self.n_kv_head}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        if self.head_size is not None and self.head_size * self.n_head == self.n_embd:
            self.head_size = None  # one spelling for the default, so equal models have equal configs
        if self.family == "gpt":
            if self.head_size is None and self.n_embd % self.n_head:
                raise LMForgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            if self.n_head % self.n_kv_head:
                raise LMForgeError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
            if self.pos == "rope" and self.head_dim % 2:
                raise LMForgeError("rope needs an even head size")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("pos", ("learned", "rope")),
                              ("mlp", ("gelu", "swiglu", "geglu"))):
            if getattr(self, name) not in allowed:
                raise LMForgeError(f"model config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:  # (false for nan too)
            raise LMForgeError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise LMForgeError(f"sliding_window must be positive, got {self.sliding_window}")
        # numbers that load without complaint and give garbage: reject them here, once, for every source
        for name in ("rope_theta", "rope_theta_local"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 1.0):
                raise LMForgeError(f"model config: {name} must be a finite number above 1, got {v}")
        if not (math.isfinite(self.norm_eps) and 0.0 < self.norm_eps < 1.0):
            raise LMForgeError(f"model config: norm_eps must be in (0, 1), got {self.norm_eps}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden"):
            if getattr(self, name) > LIMITS[name]:
                raise LMForgeError(f"model config: {name} {getattr(self, name):,} is past any model lmforge runs "
                                   f"(at most {LIMITS[name]:,}); the file is corrupt or not a model")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    # One context rule, two cases: a learned-position GPT sees at most block_size tokens and
    # slides that window over longer text (any length can be generated); a RoPE GPT's trained
    # length is a hard limit for prompt + output; recurrent models have neither.
    @property
    def context_window(self) -> int | None:
        """The window a learned-position model slides over longer text; None when it does not slide."""
        return self.block_size if self.family == "gpt" and self.pos == "learned" else None

    @property
    def context_limit(self) -> int | None:
        """The most tokens (prompt and output) a RoPE model may hold; None when unlimited."""
        return self.block_size if self.family == "gpt" and self.pos == "rope" else None

    def is_local(self, layer: int) -> bool:
        """Whether a layer uses the sliding window (Gemma 3: five local layers, then one global)."""
        if self.sliding_window is None:
            return False
        return not (self.global_every and (layer + 1) % self.global_every == 0)

    @property
    def recurrent(self) -> bool:
        return self.family in RECURRENT_FAMILIES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**_known(cls, d, "model config"))


# Sizes past any model this toolkit is for: a corrupt file saying n_layer = 1,000,000 must be
# refused before it allocates gigabytes
LIMITS = {"vocab_size": 1 << 22, "block_size": 1 << 21, "n_layer": 1024, "n_embd": 1 << 16, "n_head": 1024,
          "n_kv_head": 1024, "mlp_hidden": 1 << 18}
MAX_STEPS = 10 ** 9
MAX_NEW_TOKENS = 1 << 20


@dataclass
class TrainConfig:
    """How to train. Batch sizes are per micro-batch; grad_accum counts micro-batches per
    optimizer step across all processes, so the global batch does not change with world size."""

    steps: int = 1000
    """Optimizer steps in total."""
    batch_size: int = 12
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step, summed over all processes."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_interval: int = 250
    eval_iters: int = 20
    """Validation batches per evaluation."""
    log_interval: int = 10
    checkpoint_interval: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    seed: int = 1337
    precision: str = "auto"
    """auto, fp32, bf16 or fp16 (fp16 only on CUDA). auto picks bf16 on CUDA, fp32 on CPU."""
    time_budget: float | None = None
    """Stop cleanly (with a checkpoint) after this many seconds of training."""
    val_fraction: float = 0.1
    compile: bool = False
    """torch.compile the model (needs a C++ compiler on CPU; slow first step)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_iters", "log_interval", "eval_interval"):
            if getattr(self, name) <= 0:
                raise LMForgeError(f"train config: {name} must be positive, got {getattr(self, name)}")
        if self.steps > MAX_STEPS:
            raise LMForgeError(f"train config: steps must be at most {MAX_STEPS:,} (use --time-budget for "
                               f"open-ended runs), got {self.steps:,}")
        for name in ("checkpoint_interval", "warmup_steps", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise LMForgeError(f"train config: {name} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "val_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise LMForgeError(f"train config: {name} must be a finite number, got {getattr(self, name)}")
        if self.time_budget is not None and not math.isfinite(self.time_budget):
            raise LMForgeError("time budget must be a finite number of seconds")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise LMForgeError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not 0.0 < self.val_fraction < 0.5:
            raise LMForgeError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise LMForgeError("time budget must be positive")
        if self.lr <= 0 or self.min_lr < 0:
            raise LMForgeError("learning rates must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**_known(cls, d, "train config"))


@dataclass
class EncoderConfig:
    """A BERT-style encoder: post-norm blocks, learned absolute positions, token types."""

    vocab_size: int = 30522
    max_len: int = 512
    """Position embeddings, hence the longest input in tokens."""
    n_layer: int = 6
    n_embd: int = 384
    n_head: int = 12
    mlp_hidden: int = 1536
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "n_layer", "n_embd", "n_head", "mlp_hidden", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise LMForgeError(f"encoder config: {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise LMForgeError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        return cls(**_known(cls, d, "encoder config"))


@dataclass
class VisionConfig:
    """An image encoder (a small CNN) and a projector into a decoder's embedding space, plus the
    image preprocessing that travels with them: RGB, resized to image_size x image_size
    (bilinear), scaled to [0, 1], then (x - mean) / std per channel."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 256)
    """Output channels of the convolution stages; each stage halves the side (64 -> 4x4 cells,
    then 2x2 of them per token: 4 image tokens, so an image question prefills few positions)."""
    shuffle: int = 2
    """Pixel-shuffle factor: s x s neighbouring grid cells become one image token."""
    lm_embd: int = 576
    """The decoder's embedding width (the projector's output)."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def __post_init__(self) -> None:
        self.channels, self.mean, self.std = tuple(self.channels), tuple(self.mean), tuple(self.std)
        if self.image_size <= 0 or self.lm_embd <= 0 or self.shuffle <= 0 or not self.channels:
            raise LMForgeError("vision config: image_size, lm_embd, shuffle and channels must be positive")
        if any(c <= 0 for c in self.channels):
            raise LMForgeError(f"vision config: channels must be positive, got {self.channels}")
        if self.image_size % (2 ** len(self.channels) * self.shuffle):
            raise LMForgeError(f"vision config: image_size {self.image_size} must be divisible by "
                               f"2^stages x shuffle = {2 ** len(self.channels) * self.shuffle}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(not (s > 0) for s in self.std):
            raise LMForgeError("vision config: mean and std need 3 values each, std positive")

    @property
    def grid(self) -> int:
        """Side of the encoder's output grid."""
        return self.image_size // 2 ** len(self.channels)

    @property
    def n_tokens(self) -> int:
        """Image tokens per image, markers excluded."""
        return (self.grid // self.shuffle) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        return cls(**_known(cls, d, "vision config"))


def _known(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise LMForgeError(f"{what} must be a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise LMForgeError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
    return dict(d)


# ---------------------------------------------------------------- presets
# A preset is a pair of overrides (model, train). Sizes differ per family so that a preset
# name means roughly the same parameter budget whichever family is chosen.
_MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # a few thousand parameters: for tests, trains in seconds
    "tiny": {
        "gpt": dict(n_layer=2, n_head=2, n_embd=32, block_size=32),
        "rnn": dict(n_layer=1, n_embd=48, block_size=32),
        "gru": dict(n_layer=1, n_embd=32, block_size=32),
        "lstm": dict(n_layer=1, n_embd=32, block_size=32),
    },
    # about one million parameters in the recurrent/attention layers
    "small": {
        "gpt": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
        "rnn": dict(n_layer=2, n_embd=512, block_size=128),
        "gru": dict(n_layer=2, n_embd=288, block_size=128),
        "lstm": dict(n_layer=2, n_embd=256, block_size=128),
    },
    # about ten million: for a GPU or a patient CPU
    "medium": {
        "gpt": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
        "rnn": dict(n_layer=3, n_embd=1280, block_size=256),
        "gru": dict(n_layer=3, n_embd=768, block_size=256),
        "lstm": dict(n_layer=3, n_embd=640, block_size=256),
    },
    # nanoGPT's README CPU recipe for shakespeare_char (gpt only)
    "nanogpt-cpu": {
        "gpt": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False),
    },
}

_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=50, batch_size=8, warmup_steps=5, eval_interval=25, eval_iters=4, log_interval=5),
    "small": dict(steps=1000, batch_size=12, warmup_steps=100, eval_interval=250, eval_iters=20),
    "medium": dict(steps=5000, batch_size=32, lr=6e-4, min_lr=6e-5, warmup_steps=200, eval_interval=500),
    "nanogpt-cpu": dict(steps=2000, batch_size=12, grad_accum=1, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                        weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250,
                        eval_iters=20),
}

PRESETS = tuple(_MODEL_PRESETS)


def preset(name: str, family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (model overrides, train overrides) for a preset and family."""
    if name not in _MODEL_PRESETS:
        raise LMForgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    per_family = _MODEL_PRESETS[name]
    if family not in per_family:
        raise LMForgeError(f"preset {name!r} is defined for {', '.join(per_family)} only, not {family!r}")
    return dict(family=family, **per_family[family]), dict(_TRAIN_PRESETS[name])


def load_json(path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LMForgeError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path} is not valid JSON ({e})") from None
