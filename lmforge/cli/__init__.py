"""The `lmforge` command line: typer commands that parse their options, make one call into the
Python API (lmforge.api, lmforge.encoders, lmforge.rag.manage, lmforge.tasks) and print the
result; the HTTP server calls the same functions."""

from __future__ import annotations

import sys

import typer

from lmforge.cli import encode, lm, retrieval, serve
from lmforge.cli._common import console, parse_duration
from lmforge.errors import LMForgeError

app = typer.Typer(
    name="lmforge",
    help="Train, evaluate and sample language models, from a character-level RNN to a GPT, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
lm.register(app)
encode.register(app)
retrieval.register(app)
serve.register(app)


def _expand_multi(argv: list[str], flags=("--data",)) -> list[str]:
    """Let `--data a b c` mean `--data a --data b --data c` (click options take one value each)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg in flags:
            first = True
            while i < len(argv) and not argv[i].startswith("-"):
                if not first:
                    out.append(arg)
                out.append(argv[i])
                first = False
                i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    args = _expand_multi(list(sys.argv[1:] if argv is None else argv))
    if args[:2] in (["eval", "retrieval"], ["eval", "qa"], ["eval", "vqa"]):  # `lmforge eval CHECKPOINT` stays as it was
        args = [f"eval-{args[1]}", *args[2:]]
    try:
        app(args=args, prog_name="lmforge")
    except LMForgeError as e:
        from rich.text import Text

        console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console(stderr=True).print("interrupted")
        sys.exit(130)


__all__ = ["app", "main", "parse_duration"]
