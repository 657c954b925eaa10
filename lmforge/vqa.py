"""Visual question answering data and scoring, shared by training (lmforge.train.vision) and
evaluation (lmforge eval vqa): the easy-vqa package's splits or a folder of JSONL rows, and
exact-match accuracy of greedy replies per question type."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.engine import Engine
from lmforge.engine.vision import answer
from lmforge.errors import LMForgeError
from lmforge.images import load_image, question_ids
from lmforge.models.vision import VisionTower

CAPTION_QUESTION = "Describe the image."
YES_NO = {"yes", "no"}


@dataclass
class VQAData:
    images: torch.Tensor
    """(n, 3, S, S) uint8."""
    rows: list[tuple[int, str, str, str]]
    """(image index, question, answer, question type); captions have the question CAPTION_QUESTION."""

    def qa(self) -> list[tuple[int, str, str, str]]:
        return [r for r in self.rows if r[3] != "caption"]

    def captions(self) -> list[tuple[int, str, str, str]]:
        return [r for r in self.rows if r[3] == "caption"]


def _easy_vqa_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise LMForgeError("the built-in data set is the easy-vqa package: pip install easy-vqa (or give --data DIR)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _easy_vqa_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    return "shape" if answer in ("circle", "rectangle", "triangle") else "color"


def load_easy_vqa(split: str, size: int, limit_images: int | None = None) -> VQAData:
    """easy-VQA's train or test split. Each image also gets a caption made from its own
    answers ("a red circle"), for the align stage."""
    base = _easy_vqa_dir() / split
    qs = json.loads((base / "questions.json").read_text(encoding="utf-8"))
    ids = sorted({q[2] for q in qs})
    if limit_images is not None:
        ids = ids[:limit_images]
    index = {img: k for k, img in enumerate(ids)}
    images = torch.stack([load_image(base / "images" / f"{img}.png", size) for img in ids])
    rows, color, shape = [], {}, {}
    for q, a, img in qs:
        if img not in index:
            continue
        kind = _easy_vqa_type(a)
        rows.append((index[img], q, a, kind))
        if kind == "color":
            color[img] = a
        elif kind == "shape":
            shape[img] = a
    for img in ids:
        if img in color and img in shape:
            rows.append((index[img], CAPTION_QUESTION, f"a {color[img]} {shape[img]}", "caption"))
    return VQAData(images, rows)


def load_folder(folder: Path, split: str, size: int) -> VQAData:
    """{split}.jsonl in `folder`: {"image", "question", "answer"[, "type"]} or {"image", "caption"}."""
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise LMForgeError(f"no {split}.jsonl in {folder} (rows of {{\"image\", \"question\", \"answer\"}} or "
                           f"{{\"image\", \"caption\"}})")
    index: dict[str, int] = {}
    pixels, rows = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise LMForgeError(f"{path}:{n}: needs an \"image\" path")
        if "caption" in row:
            q, a, kind = CAPTION_QUESTION, row["caption"], "caption"
        elif "question" in row and "answer" in row:
            q, a = row["question"], row["answer"]
            kind = row.get("type") or ("yes/no" if str(a).lower() in YES_NO else "other")
        else:
            raise LMForgeError(f"{path}:{n}: needs \"question\" and \"answer\", or \"caption\"")
        if not isinstance(q, str) or not isinstance(a, str) or not a.strip():
            raise LMForgeError(f"{path}:{n}: question, answer and caption must be non-empty text")
        img = row["image"]
        if img not in index:
            index[img] = len(pixels)
            pixels.append(load_image(folder / img, size, what=f"{path}:{n}: {img}"))
        rows.append((index[img], q, a.strip(), kind))
    if not rows:
        raise LMForgeError(f"{path} has no rows")
    return VQAData(torch.stack(pixels), rows)


def load_data(folder: Path | None, split: str, size: int) -> VQAData:
    return load_easy_vqa(split, size) if folder is None else load_folder(Path(folder), split, size)



def vqa_accuracy(engine: Engine, tower: VisionTower, tok, chat: bool, images: torch.Tensor, rows,
                 batch: int = 64) -> dict[str, float]:
    """Exact-match accuracy of greedy replies (case and surrounding space ignored), overall
    ("all") and per question type."""
    hits: Counter = Counter()
    total: Counter = Counter()
    stops = tok.stop_ids
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        prompts = [question_ids(tok, q, chat) for _, q, _, _ in part]
        outs = answer(engine, tower, prompts, [images[i:i + 1] for i, _, _, _ in part], stops)
        for (_, _, a, kind), ids in zip(part, outs):
            ok = tok.decode(ids).strip().lower().rstrip(".") == a.strip().lower()
            for k in (kind, "all"):
                total[k] += 1
                hits[k] += ok
    return {k: hits[k] / total[k] for k in total}
