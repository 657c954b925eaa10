"""Images as prompts, as one call each: train a vision tower for a decoder, score a vision run on
visual questions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError


def finetune(lm: str, out: Path, data: Path | None = None, *, steps: int = 1500, batch_size: int = 16,
             lr: float = 2e-3, time_budget: float | None = None, eval_every: int = 250, seed: int = 1337,
             resume: bool = False, device: str = "auto", log=print, progress: bool = True,
             stop_after: int | None = None) -> dict[str, Any]:
    """Train an image encoder + projector that feed the decoder `lm` (a pulled model's name or a
    path), which stays frozen; see lmforge.train.vision. Returns the report."""
    from lmforge.api import LM
    from lmforge.train.vision import VisionTrainConfig, train_vision

    if data is not None and not Path(data).is_dir():
        raise LMForgeError(f"--data must be a folder holding train.jsonl, got {data}")
    base = LM.load(lm, device=device, quantize="none")  # float weights: gradients flow through them
    if base.config.recurrent:
        raise LMForgeError(f"{lm} is a recurrent model; image prompts need a transformer decoder")
    spec = str(Path(lm).resolve()) if Path(lm).exists() else lm
    cfg = VisionTrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, time_budget=time_budget,
                            eval_every=eval_every, seed=seed)
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
