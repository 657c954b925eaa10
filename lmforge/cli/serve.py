"""`lmforge serve`: the OpenAI-compatible HTTP API and the web chat page."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lmforge.cli._common import Device, Quantize, console


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Language models to serve: pulled names, .gguf files, run or Hugging Face folders "
             "(default: smollm2-135m-instruct).", show_default=False)] = None,
    embed_model: Annotated[str, typer.Option(help="Sentence encoder for /v1/embeddings and dense retrieval: a pulled "
                                                  "encoder or folder; auto: minilm-l6 when pulled; none: no embeddings.")]
    = "auto",
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", help="A collection to answer from (/v1/rag/ask and the page's documents mode); repeatable.")]
    = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    parallel: Annotated[int, typer.Option(help="Sequences decoded together per model (cache slots).", min=1,
                                          max=256)] = 8,
    api_key: Annotated[Optional[str], typer.Option(
        help="Require `Authorization: Bearer KEY` on every /v1 route (or set LMFORGE_API_KEY).")] = None,
    cors: Annotated[Optional[list[str]], typer.Option(
        "--cors", help="Let pages from this origin call the API (e.g. http://localhost:3000); repeatable. "
                       "Default: none.")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a slot per model; more get 503.", min=0)] = 64,
    max_tokens: Annotated[int, typer.Option(help="The largest max_tokens a request may ask for (and the default).",
                                            min=1)] = 2048,
    max_n: Annotated[int, typer.Option(help="Choices (n) x prompts per request.", min=1)] = 8,
    max_body: Annotated[int, typer.Option(help="Largest request body, in KiB.", min=1)] = 2048,
    timeout: Annotated[float, typer.Option(help="Seconds a generation may run; then it ends with finish_reason "
                                                "length.", min=1)] = 600,
    device: Device = "auto",
    quantize: Quantize = "auto",
):
    """Serve models over an OpenAI-compatible HTTP API (chat, completions, embeddings, grounded
    answers, /metrics) with a web chat page at /. Every request joins the same continuous batch."""
    from lmforge.server import serve as run, Limits

    limits = Limits(max_body=max_body * 1024, max_tokens=max_tokens, max_n=max_n, parallel=parallel,
                    max_queue=max_queue, timeout=timeout)
    out = console(stderr=True)
    run(models or (), embed_model=embed_model, collections=collection or (), host=host, port=port, api_key=api_key,
        cors=cors or (), limits=limits, device=device, quantize=quantize,
        log=lambda s: out.print(s, markup=False))
