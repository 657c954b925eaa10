"""Images as prompts, as one call each: train a vision tower for a decoder, score a vision run on
visual questions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError


def finetune(lm: str, out: Path, data: Path | None = None, *, steps: int = 1500, batch_size: int = 32,
             lr: float = 2e-3, lora_rank: int = 8, time_budget: float | None = None, eval_every: int = 250,
             seed: int = 1337, resume: bool = False, device: str = "auto", log=print, progress: bool = True,
             stop_after: int | None = None) -> dict[str, Any]:
    """Train an image encoder + projector that feed the decoder `lm` (a pulled model's name or a
    path), and rank-`lora_rank` adapters on the decoder (0: none, the decoder as it is); see
    lmforge.train.vision. Returns the report."""
    from lmforge.api import LM
    from lmforge.train.vision import VisionTrainConfig, train_vision

    if data is not None and not Path(data).is_dir():
        raise LMForgeError(f"--data must be a folder holding train.jsonl, got {data}")
    base = LM.load(lm, device=device, quantize="none")  # float weights: gradients flow through them
    if base.config.recurrent:
        raise LMForgeError(f"{lm} is a recurrent model; image prompts need a transformer decoder")
    spec = str(Path(lm).resolve()) if Path(lm).exists() else lm
    cfg = VisionTrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, lora_rank=lora_rank,
                            time_budget=time_budget, eval_every=eval_every, seed=seed)
    return train_vision(base.model, base.tokenizer, spec, bool(base.tokenizer.chat_template), Path(out), cfg,
                        data, log=log, progress=progress, resume=resume, stop_after=stop_after)


def evaluate(run: str | Path, data: Path | None = None, split: str = "test", limit: int | None = None,
             device: str = "auto", quantize: str = "auto") -> dict[str, Any]:
    """Exact-match accuracy of a vision run's greedy answers on a split's questions (captions
    left out), overall ("all") and per question type; with the count of questions."""
    import random

    from lmforge.api import LM
    from lmforge.vqa import load_data, vqa_accuracy

    lm = LM.load(run, device=device, quantize=quantize)
    if lm.vision is None:
        raise LMForgeError(f"{run} is not a vision run (made by lmforge finetune vision)")
    ds = load_data(data, split, lm.vision.config.image_size)
    rows = ds.qa()
    if limit is not None and limit < len(rows):
        rows = random.Random(0).sample(rows, limit)
    acc = vqa_accuracy(lm.engine, lm.vision, lm.tokenizer, lm.vision_chat, ds.images, rows)
    return {"accuracy": acc, "questions": len(rows), "images": len({r[0] for r in rows})}


def attention_map(lm, image, question: str, out: Path, max_new_tokens: int = 8) -> dict[str, Any]:
    """Answer a question about an image greedily, then save a picture of where each answer
    token looked: for the position that produced it, the attention its queries paid to each of
    the image's tokens (mean over layers and heads, from the decoder's reference attention path),
    drawn over the image as a grid of the projector's cells. Returns the answer and, per token,
    the image-token weights and their share of all attention."""
    import numpy as np
    import torch

    from lmforge.common import atomic_write_bytes
    from lmforge.engine.vision import image_prompt
    from lmforge.images import load_image, question_ids
    from lmforge.models.vision import IMAGE

    if lm.vision is None:
        raise LMForgeError("this model takes no images (train a vision run: lmforge finetune vision)")
    cfg = lm.vision.config
    pixels = load_image(image, cfg.image_size) if not isinstance(image, torch.Tensor) else image
    ids = question_ids(lm.tokenizer, question, lm.vision_chat)
    embeds, row_ids = image_prompt(lm.model, lm.vision, ids, pixels[None])
    events = list(lm.events(question, max_new_tokens, temperature=0.0, images=[pixels]))
    stops = set(lm.tokenizer.stop_ids)
    answer = [e.token for e in events if e.token is not None and e.token not in stops]
    if not answer:
        raise LMForgeError("the model answered nothing, so there is no answer token to map")
    with torch.no_grad():
        tok = lm.model.embed(torch.tensor([answer[:-1]], dtype=torch.long)).float()[0] if len(answer) > 1 else \
            embeds[:0]
        seq = torch.cat([embeds, tok], 0)[None]  # (1, T, C): the prompt and the answer fed back
        _, _, extra = lm.model(input_embeds=seq, output_attentions=True)
    att = torch.stack([a[0].float().mean(0) for a in extra["attentions"]]).mean(0)  # (T, T) mean over layers, heads
    first, n, side = row_ids.index(IMAGE) + 1, cfg.n_tokens, cfg.grid // cfg.shuffle  # (past the start marker)
    P = embeds.size(0)
    rows = []
    for k, t in enumerate(answer):
        w = att[P - 1 + k, first:first + n]  # the query that produced answer token k, over the image's tokens
        rows.append({"token": lm.tokenizer.decode([t]), "weights": w.reshape(side, side).tolist(),
                     "image_share": float(w.sum())})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = pixels.permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(2.4 * (len(rows) + 1), 2.8), dpi=110)
    axes = np.atleast_1d(axes)
    axes[0].imshow(img)
    axes[0].set_title(question if len(question) < 28 else question[:26] + "…", fontsize=8)
    for ax, r in zip(axes[1:], rows):
        w = np.asarray(r["weights"])
        ax.imshow(img)
        ax.imshow(w / max(w.max(), 1e-12), cmap="magma", alpha=0.6, extent=(0, img.shape[1], img.shape[0], 0),
                  interpolation="nearest")
        ax.set_title(f"{r['token']!r}: {100 * r['image_share']:.0f}% on the image", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(out), buf.getvalue())
    return {"answer": lm.tokenizer.decode(answer), "tokens": rows, "picture": str(out)}
