"""Image commands: finetune vision, eval vqa (generate and chat take --image)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli._common import Device, Quantize, console, parse_duration
from lmforge.errors import LMForgeError


def register(app: typer.Typer, finetune_app: typer.Typer) -> None:
    finetune_app.command("vision")(finetune_vision)
    app.command("eval-vqa", help="Score a vision run on visual questions (also: lmforge eval vqa).")(eval_vqa)


def finetune_vision(
    out: Annotated[Path, typer.Option(help="Run folder to create (must not exist or be empty).")],
    lm: Annotated[str, typer.Option(help="The decoder the images feed (frozen but for its adapters).")] = "smollm2-135m-instruct",
    data: Annotated[Optional[Path], typer.Option(
        help="Folder with train.jsonl rows {image, question, answer} or {image, caption} (default: the "
             "easy-vqa package).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    time_budget: Annotated[Optional[str], typer.Option(
        help="Stop after this long (e.g. 20m), the LR schedule following the clock.")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Questions (or captions) per step; up to 8 about one image share a sequence.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the encoder and projector.")] = 2e-3,
    lora_rank: Annotated[int, typer.Option(
        help="Rank of the decoder's low-rank adapters, trained with the tower (0: the decoder as it is).")] = 8,
    eval_every: Annotated[int, typer.Option(help="Steps between validations (held-out images).")] = 250,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1337,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same --out.")] = False,
    device: Device = "auto",
):
    """Teach a decoder to see: train an image encoder and projector whose vectors the decoder
    reads in its prompt, and low-rank adapters on the decoder (adapters first on the questions
    with the caption's words in the image's place, then captions, then questions on images)."""
    from lmforge.tasks import vision

    for name, v in (("steps", steps), ("batch-size", batch_size), ("eval-every", eval_every)):
        if v <= 0:
            raise LMForgeError(f"--{name} must be positive, got {v}")
    if lora_rank < 0:
        raise LMForgeError(f"--lora-rank must be 0 or more, got {lora_rank}")
    if not (0 < lr < 1):
        raise LMForgeError(f"--lr must be in (0, 1), got {lr}")
    con = console()
    report = vision.finetune(lm, out, data, steps=steps, batch_size=batch_size, lr=lr, lora_rank=lora_rank,
                             time_budget=parse_duration(time_budget), eval_every=eval_every, seed=seed, resume=resume,
                             device=device, log=lambda m: con.print(m, markup=False))
    con.print(f"validation accuracy {report['val_accuracy']:.4f} ({report['val_questions']:,} questions on held-out "
              f"images, {report['seconds']:.0f} s); saved to {out}\nnext: lmforge generate {out} "
              f"\"What color is the shape?\" --image PATH", markup=False)


def eval_vqa(
    run: Annotated[Path, typer.Argument(help="A run folder made by lmforge finetune vision.")],
    data: Annotated[Optional[Path], typer.Option(help="Folder with test.jsonl (default: easy-vqa's test split).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Score a random sample of this many questions.")] = None,
    quantize: Quantize = "auto",
    device: Device = "auto",
):
    """Exact-match accuracy of a vision run's answers, overall and per question type."""
    from rich.table import Table

    from lmforge.tasks import vision

    if limit is not None and limit <= 0:
        raise LMForgeError(f"--limit must be positive, got {limit}")
    res = vision.evaluate(run, data, limit=limit, device=device, quantize=quantize)
    table = Table(title=f"{run}: {res['questions']:,} questions on {res['images']:,} images")
    table.add_column("question type")
    table.add_column("accuracy", justify="right")
    for kind, acc in sorted(res["accuracy"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
        table.add_row(kind, f"{acc:.4f}")
    console().print(table)
