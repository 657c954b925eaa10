"""What the commands share: the console, the options several commands declare, progress bars
and streaming output. No application logic here or in the command modules: each command parses
its options, makes one call into the Python API and prints the result."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

from lmforge.errors import LMForgeError


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '3m', '1.5h' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise LMForgeError(f"cannot read time budget {text!r}; use e.g. 90, 90s, 3m or 1h")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds <= 0:
        raise LMForgeError(f"a time budget must be positive, got {text!r}")
    return seconds


def parse_int_list(text: str, flag: str) -> list[int]:
    """'6,8,10' -> [6, 8, 10]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LMForgeError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise LMForgeError(f"{flag} is empty")
    return values


def unescape(text: str | None) -> str | None:
    """A typed backslash-n or backslash-t in an option becomes a newline or tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def choice(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=what)
    return value


def stream_out(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@contextmanager
def progress(label: str, unit: str, stderr: bool = True):
    """A rich progress bar with a rate; yields the callback progress(done, total)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console(stderr=stderr), transient=True) as bar:
        task = bar.add_task(label, total=None, rate="")

        def update(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:.1f} {unit}/s")

        yield update


# options declared by several commands, worded once
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Quantize = Annotated[str, typer.Option(help="auto (pretrained models quantized on CPU: a mostly 4-bit GGUF's 4-bit "
                                            "blocks as 4-bit groups, the rest int8), none, int8 or int4.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model for faster decoding (the first "
                                                         "reply waits a minute or more for the compiler).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")]
CollectionName = Annotated[str, typer.Option("--collection", help="Collection name.")]
TopK = Annotated[int, typer.Option("-k", help="How many chunks / sources.")]
Mode = Annotated[str, typer.Option(help="bm25, dense or hybrid (BM25 and dense fused by reciprocal rank; BM25 alone "
                                        "when the collection has no vectors).")]
DenseWeight = Annotated[float, typer.Option(help="Hybrid fusion: the dense ranking's weight against BM25's 1 (lower "
                                                 "it for text the encoder does not know).")]
Rerank = Annotated[str, typer.Option(help="Rerank the retrieved chunks: none, encoder (best sentence) or llm (how "
                                          "likely the model finds the question after each).")]
Embed = Annotated[str, typer.Option(help="Sentence encoder for dense and hybrid ('none': BM25 only).")]


# the specification options (constrained output), shared by generate and chat
JsonSchema = Annotated[Optional[str], typer.Option(
    "--json-schema", help="Output follows this JSON Schema (a .json file or JSON text).")]
JsonMode = Annotated[bool, typer.Option("--json", help="Output is a JSON object or array.")]
Regex = Annotated[Optional[str], typer.Option(help="Output matches this regular expression.")]
Choices = Annotated[Optional[list[str]], typer.Option("--choice", help="Output is exactly one of these (repeat the option).")]
Grammar = Annotated[Optional[Path], typer.Option(help="Output follows this grammar file (Lark, or GBNF with ::=).")]
