"""Image prompts for the engine: token ids with IMAGE placeholders plus pixels become the (T, C)
prompt embeddings a Request carries. Token ids in, token ids out, like the rest of the engine."""

from __future__ import annotations

import itertools

from collections.abc import Sequence

import torch

from lmforge.engine.engine import Engine, Request
from lmforge.engine.sampling import SamplingParams
from lmforge.models.vision import IMAGE, VisionTower, splice


@torch.no_grad()
def image_prompt(model, tower: VisionTower, ids: Sequence[int], pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """ids with one IMAGE per image, pixels uint8 (n, 3, S, S) -> prompt embeddings (T', C) and
    one id per embedding row (each image's N + 2 rows marked IMAGE): a Request takes both, so
    that the text before the first image can be reused from the cache."""
    dev = next(tower.parameters()).device
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    tok = model.embed(ids_t.clamp(min=0)[None].to(model_device(model)))[0].float().cpu()  # (T, C)
    vecs = tower(pixels.to(dev)).float().cpu()  # (n, N + 2, C)
    embeds, _ = splice(tok, ids_t, vecs)
    rows = vecs.size(1)
    return embeds, [j for i in ids for j in ([i] * rows if i == IMAGE else [i])]


def model_device(model) -> torch.device:
    # a quantized model may hold buffers only; state_dict() would build a dict of every tensor
    return next(itertools.chain(model.parameters(), model.buffers())).device


def answer(engine: Engine, tower: VisionTower, prompts: Sequence[Sequence[int]], pixels: Sequence[torch.Tensor],
           stop_ids: Sequence[int], max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy replies (ids, the stop id excluded) to image prompts, all in the engine at once.
    pixels[i]: the uint8 (n_i, 3, S, S) images of prompt i."""
    reqs = []
    for ids, px in zip(prompts, pixels):
        embeds, row_ids = image_prompt(engine.model, tower, ids, px)
        reqs.append(Request(row_ids, max_new_tokens, SamplingParams(temperature=0.0), stop_ids, embeds=embeds))
    out: dict[int, list[int]] = {}
    stops = set(stop_ids)
    for ev in engine.run(reqs):
        if ev.token is not None and ev.token not in stops:
            out.setdefault(ev.request_id, []).append(ev.token)
    return [out.get(r.id, []) for r in reqs]
