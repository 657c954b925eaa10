"""Retrieval commands: index add/list/remove, search, ask, eval retrieval, eval qa."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli._common import CollectionName, DenseWeight, Embed, Mode, Rerank, TopK, console, progress
from lmforge.errors import LMForgeError


def register(app: typer.Typer) -> None:
    index_app = typer.Typer(help="Collections of documents for retrieval (lmforge search).", no_args_is_help=True)
    index_app.command("add")(index_add)
    index_app.command("list")(index_list)
    index_app.command("remove")(index_remove)
    app.add_typer(index_app, name="index")
    app.command()(search)
    app.command()(ask)
    app.command("eval-retrieval", hidden=True)(eval_retrieval)
    app.command("eval-qa", hidden=True)(eval_qa)


def _log(msg: str) -> None:
    console(stderr=True).print(msg, markup=False)


def _report(r) -> None:
    if r.built:
        _log(f"built {' and '.join(r.built)} index for {r.chunks:,} chunks")
    print(f"{r.collection}: {r.added} added, {r.updated} updated, {r.unchanged} unchanged; {r.chunks:,} chunks in all"
          + (f"; vectors from {r.encoder}" if r.encoder is not None else "; BM25 only (no embedding model)"))


def index_add(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Files or folders (recursive; text, Markdown, HTML, source). None: Python's own docs.")] = None,
    collection: CollectionName = "pydoc",
    chunk_size: Annotated[int, typer.Option(help="Target chunk size in characters.")] = 1000,
    overlap: Annotated[int, typer.Option(help="Characters of whole sentences shared by neighbouring chunks.")] = 150,
    embed: Annotated[Optional[str], typer.Option(
        help="Sentence encoder for dense vectors: a pulled name or a folder; 'none' for BM25 only. Default: the "
             "collection's own, else minilm-l6 when it has been pulled.")] = None,
):
    """Add documents to a collection; unchanged files are skipped, changed ones replaced.

    Example: lmforge index add notes/ --collection notes
    """
    from lmforge.rag import manage

    with progress("index", "docs") as bar:
        r = manage.index(collection, paths, chunk_size, overlap, embed, bar)
    _report(r)


def index_list(collection: Annotated[Optional[str], typer.Option(help="Show this collection's documents.")] = None):
    """List the collections, or one collection's documents."""
    from lmforge.rag import manage

    if collection is not None:
        for source, chars, chunks in manage.documents(collection):
            print(f"{source}\t{chars:,} chars\t{chunks} chunks")
        return
    rows = manage.list_collections()
    if not rows:
        print("no collections yet; make one with: lmforge index add [PATHS]")
    for name, docs, chunks in rows:
        print(f"{name}\t{docs} documents\t{chunks} chunks")


def index_remove(
    sources: Annotated[list[str], typer.Argument(help="Paths (a folder removes what lies under it) or pydoc:TOPIC.")],
    collection: CollectionName = "pydoc",
):
    """Remove documents from a collection."""
    from lmforge.rag import manage

    n, built = manage.remove(collection, sources)
    if built:
        _log(f"built {' and '.join(built)} index")
    print(f"{collection}: {n} document(s) removed")


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: CollectionName = "pydoc",
    k: TopK = 5,
    mode: Mode = "hybrid",
    dense_weight: DenseWeight = 1.0,
    rerank: Rerank = "none",
    model: Annotated[str, typer.Option(help="Model for --rerank llm.")] = "smollm2-135m-instruct",
):
    """Search a collection and print the best chunks with their scores and sources."""
    from lmforge.rag import manage

    manage.check_options(k, mode, rerank)
    lm = _load_lm(model) if rerank == "llm" else None
    hits = manage.search(query, collection, k, mode, dense_weight, rerank, lm, log=_log)
    if not hits:
        print("no matches")
    for i, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" > {h.heading}" if h.heading else "")
        print(f"[{i}] {h.score:.4g}  {where}  (chars {h.start}-{h.end})")
        print("    " + " ".join(h.text.split())[:300])


def _load_lm(model: str):
    from lmforge.api import LM

    return LM.load(model)


class _Paragraphs:
    """Prints streamed text, holding the separators after a sentence back until more text comes
    (no blank lines at the end of an answer)."""

    def __init__(self):
        self.held: list[str] = []

    def __call__(self, text: str) -> None:
        body = text.rstrip()
        if body:
            sys.stdout.write("".join(self.held) + body)
            sys.stdout.flush()
            self.held.clear()
        self.held.append(text[len(body):])


def ask(
    question: Annotated[str, typer.Argument(help="A question about the collection's documents.")],
    collection: Annotated[str, typer.Option(help="Collection name (lmforge index add builds it).")] = "pydoc",
    model: Annotated[str, typer.Option(help="Model that answers: a chat model, or a base model (plain prompt).")] = "smollm2-135m-instruct",
    k: TopK = 3,
    mode: Mode = "hybrid",
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 200,
    dense_weight: DenseWeight = 1.0,
    rerank: Rerank = "none",
):
    """Answer a question from a collection, citing its sources by number.

    Example: lmforge ask "What does the with statement do?"
    """
    from lmforge.rag import manage

    manage.check_options(k, mode, rerank)  # (before the model loads: a bad flag fails at once)
    answer = manage.ask(question, _load_lm(model), collection, k, mode, max_tokens, dense_weight, rerank,
                        on_text=_Paragraphs(), log=_log)
    sys.stdout.write("\n")
    if answer.removed:
        print(f"(removed citations of sources that were not given: {', '.join(f'[{n}]' for n in answer.removed)})")
    if answer.unsupported:
        print(f"(removed citations whose source does not back the sentence: "
              f"{', '.join(f'[{n}]' for n in answer.unsupported)})")
    if answer.cited:
        print("\nSources:")
        for n in sorted(answer.cited):
            h = answer.sources[n - 1]
            print(f"  [{n}] {h.source}" + (f" > {h.heading}" if h.heading else "") + f"  (chars {h.start}-{h.end})")


def eval_retrieval(
    beir: Annotated[Path, typer.Option(help="A BEIR folder: corpus.jsonl[.gz], queries.jsonl, qrels/SPLIT.tsv.")],
    split: Annotated[str, typer.Option(help="Which qrels file to score.")] = "test",
    embed: Embed = "minilm-l6",
    max_queries: Annotated[Optional[int], typer.Option(help="Score only the first N judged queries.")] = None,
):
    """Retrieval quality (lmforge eval retrieval --beir DIR): recall@1/5/10, MRR@10 and nDCG@10 for
    BM25, dense and hybrid search, side by side, each document indexed as one chunk."""
    from rich.table import Table

    from lmforge.rag.evaluate import evaluate_beir

    r = evaluate_beir(beir, split, embed, max_queries=max_queries, log=_log)
    info = r.pop("_")
    table = Table(title=f"{beir.name} ({split}): {info['documents']:,} documents, {info['queries']:,} queries")
    cols = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "ms_per_query")
    table.add_column("mode")
    for c in cols:
        table.add_column(c, justify="right")
    for mode, m in r.items():
        table.add_row(mode, *(f"{m[c]:.4f}" if c != "ms_per_query" else f"{m[c]:.1f}" for c in cols))
    console().print(table)


def eval_qa(
    squad: Annotated[Path, typer.Option(help="A SQuAD-format JSON file (SQuAD 1.1/2.0, CMRC 2018).")],
    model: Annotated[str, typer.Option(help="Model that answers (a base model gets a plain prompt); "
                                             "'none' scores retrieval only.")] = "smollm2-135m-instruct",
    embed: Embed = "minilm-l6",
    k: Annotated[int, typer.Option("-k", help="Contexts retrieved per question.")] = 3,
    mode: Mode = "hybrid",
    max_answers: Annotated[int, typer.Option(help="Questions answered by the model (0: all).")] = 50,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 48,
    dense_weight: DenseWeight = 1.0,
):
    """Question answering (lmforge eval qa --squad FILE): the contexts are indexed, every question
    is retrieved (hit@1, hit@k: its own context found), and the first --max-answers are answered
    by `ask` and scored (exact match, F1, answer contained)."""
    from rich.table import Table

    from lmforge.rag import manage
    from lmforge.rag.evaluate import evaluate_squad

    manage.check_options(k, mode)
    if not squad.is_file():
        raise LMForgeError(f"no such file: {squad}")
    if max_answers < 0:
        raise LMForgeError("--max-answers must be 0 (all) or more")
    err = console(stderr=True)
    r = evaluate_squad(squad, model, embed, k=k, mode=mode, max_answers=max_answers or None, max_new_tokens=max_tokens,
                       dense_weight=dense_weight, log=err.print,
                       on_answer=lambda q, a, g: err.print(f"[dim]{q}[/dim] -> {a[:80]!r} (gold {g[0]!r})"))
    table = Table(title=f"{squad.name}: {r['contexts']:,} contexts, {r['questions']:,} questions, {r['mode']} retrieval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, v in r.items():
        if key not in ("contexts", "questions", "mode"):
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    console().print(table)
