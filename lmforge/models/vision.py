"""Visual input as a prompt: a small CNN image encoder, a projector into a decoder's token-embedding
space, and the splice that puts an image's vectors into a prompt.

    pixels (B, 3, S, S)
      -> stages, each a stride-2 convolution and a residual 3x3 one      (B, C, g, g), g = S / 2^stages
      -> pixel unshuffle by s: s x s neighbouring cells side by side     (B, C s^2, g/s, g/s)
      -> one token per cell, row by row                                  (B, N, C s^2), N = (g/s)^2
      -> MLP into the decoder's width                                    (B, N, D)
      -> between a learned start and end vector                          (B, N + 2, D)

The decoder reads these N + 2 vectors where a prompt holds the placeholder id IMAGE (it is never a
real token). The decoder is not part of this module: the engine and the trainer hand the spliced
embeddings to it through its input_embeds path.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import VisionConfig

IMAGE = -1
"""Placeholder id in a prompt: one image's vectors go there."""


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.conv = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.down(x)))  # (B, cout, H/2, W/2)
        return x + F.gelu(self.norm2(self.conv(x)))


class ImageEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        chans = (3, *cfg.channels)
        self.stages = nn.ModuleList(Stage(a, b) for a, b in zip(chans[:-1], chans[1:]))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        if self.stages[0].down.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the layout the weights were put in
        for stage in self.stages:
            x = stage(x)
        return x  # (B, C, g, g)


class Projector(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shuffle = cfg.shuffle
        self.fc1 = nn.Linear(cfg.channels[-1] * cfg.shuffle ** 2, cfg.lm_embd)
        self.fc2 = nn.Linear(cfg.lm_embd, cfg.lm_embd)
        self.start = nn.Parameter(torch.empty(cfg.lm_embd))
        self.end = nn.Parameter(torch.empty(cfg.lm_embd))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(grid, self.shuffle)  # (B, C s^2, g/s, g/s)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C s^2) row-major cells
        x = self.fc2(F.gelu(self.fc1(x)))  # (B, N, D)
        B = x.size(0)
        return torch.cat([self.start.expand(B, 1, -1), x, self.end.expand(B, 1, -1)], 1)  # (B, N + 2, D)


class VisionTower(nn.Module):
    """Encoder + projector: pixels in, prompt vectors out."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.encoder = ImageEncoder(cfg)
        self.projector = Projector(cfg)

    @torch.no_grad()
    def init_weights(self, embed_std: float = 0.02) -> None:
        """Convolutions He-normal, GroupNorm identity, the MLP scaled so that its outputs start
        about as large as the decoder's token embeddings (embed_std per coordinate).

        | tensor              | init                              |
        |---------------------|-----------------------------------|
        | conv weights        | normal(0, sqrt(2 / fan_in))       |
        | norm weight / bias  | ones / zeros                      |
        | fc1                 | normal(0, 1 / sqrt(fan_in))       |
        | fc2                 | normal(0, embed_std / sqrt(D) * 2)|
        | start, end          | normal(0, embed_std)              |
        | biases              | zeros                             |
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        p = self.projector
        nn.init.normal_(p.fc1.weight, std=1.0 / math.sqrt(p.fc1.in_features))
        nn.init.zeros_(p.fc1.bias)
        nn.init.normal_(p.fc2.weight, std=2.0 * embed_std / math.sqrt(p.fc2.in_features))
        nn.init.zeros_(p.fc2.bias)
        nn.init.normal_(p.start, std=embed_std)
        nn.init.normal_(p.end, std=embed_std)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> the encoder's input scale (B, 3, S, S)."""
        cfg = self.config
        mean = torch.tensor(cfg.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or already normalised float pixels (B, 3, S, S) -> (B, N + 2, D)."""
        if pixels.dtype == torch.uint8:
            pixels = self.normalize(pixels)
        return self.projector(self.encoder(pixels))


def build_tower(cfg: VisionConfig, device: torch.device | str = "cpu", embed_std: float = 0.02,
                init: bool = True) -> VisionTower:
    """Built on the meta device, then materialised and initialised once (as the decoders are)."""
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower.to_empty(device=device)
    if init:
        tower.init_weights(embed_std)
    return tower


def splice(token_embeds: torch.Tensor, ids: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Replace each IMAGE placeholder of `ids` (T,) by one image's vectors.

    token_embeds: (T, D), the decoder's embedding of ids (placeholder rows are ignored);
    images: (n, N + 2, D), one per placeholder in order. Returns (T - n + n (N + 2), D) and the
    position of each image's first vector in the result."""
    where = (ids == IMAGE).nonzero().flatten().tolist()
    if len(where) != images.size(0):
        raise ValueError(f"the prompt holds {len(where)} image placeholder(s) for {images.size(0)} image(s)")
    parts, starts, prev, length = [], [], 0, 0
    for k, w in enumerate(where):
        parts.append(token_embeds[prev:w])
        length += w - prev
        starts.append(length)
        parts.append(images[k].to(token_embeds.dtype))
        length += images.size(1)
        prev = w + 1
    parts.append(token_embeds[prev:])
    return torch.cat(parts, 0), starts
