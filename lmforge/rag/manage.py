"""Collections as the CLI and the server use them: build, open for search (the default one built
on first use), list, remove, and the retrieval options they share. Each is one call; progress
and messages go to callbacks, so the caller decides how they are shown."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.rag.collection import (DEFAULT_COLLECTION, Collection, OldSchema, _valid_name, collections_root,
                                    expand_paths, only_pydoc)

MODES = ("bm25", "dense", "hybrid")
Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def check_options(k: int, mode: str, rerank: str = "none") -> None:
    """The options search, ask and eval qa share, checked before anything is loaded."""
    from lmforge.rag.rerank import RERANKERS

    if k < 1:
        raise LMForgeError("-k must be at least 1")
    if mode not in MODES:
        raise LMForgeError(f"unknown --mode {mode!r}: use bm25, dense or hybrid")
    if rerank not in RERANKERS:
        raise LMForgeError(f"unknown --rerank {rerank!r}: use {', '.join(RERANKERS)}")


@dataclass
class IndexReport:
    collection: str
    added: int
    updated: int
    unchanged: int
    chunks: int
    encoder: str | None
    """The sentence encoder that made the vectors (None: BM25 only)."""
    built: list[str] = field(default_factory=list)
    """Search indexes built for the collection's size (in-memory BM25, HNSW)."""
    seconds: float = 0.0


def index(collection: str, paths: list[Path] | None = None, chunk_size: int = 1000, overlap: int = 150,
          embed: str | None = None, progress: Callable[[int, int], None] | None = None) -> IndexReport:
    """Ingest files or folders (None: Python's own docs) into a collection, creating it; then
    build the search indexes its size uses, so that the first query is fast. embed: a sentence
    encoder's name or folder, "none" for BM25 only, None for the collection's own (else
    minilm-l6 when it has been pulled). progress(done, total) after each document."""
    files = expand_paths(paths) if paths else None  # bad paths fail before a collection is created
    folder = collections_root() / _valid_name(collection)  # (checked first: the folder may be removed below)
    new = not (folder / "collection.db").is_file()
    try:
        return _index(collection, files, chunk_size, overlap, embed, progress)
    except BaseException:
        if new and folder.is_dir():  # a failed first add leaves no empty collection behind
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _index(collection, files, chunk_size, overlap, embed, progress) -> IndexReport:
    with Collection.open(collection, create=True) as col:
        spec = embed or col.embed_model
    if spec is None:
        from lmforge import store

        spec = "minilm-l6" if store.find("minilm-l6") is not None else "none"
    encoder = None
    if spec != "none":
        from lmforge.encoders import Encoder

        encoder = Encoder.load(spec)
    from pydoc_data.topics import topics

    total = len(files) if files is not None else len(topics)
    done = [0]

    def step(_source: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    t0 = time.perf_counter()
    with Collection.open(collection, create=True, encoder=encoder) as col:
        r = col.add_pydoc(chunk_size, overlap, step) if files is None else col.add_paths(files, chunk_size, overlap, step)
        built = col.refresh()
    return IndexReport(collection, r.added, r.updated, r.unchanged, r.chunks,
                       encoder.spec if encoder is not None else None, list(built or []), time.perf_counter() - t0)


def open_for_search(collection: str = DEFAULT_COLLECTION, use_vectors: bool = True, log: Log = _quiet,
                    progress: Callable[[int, int], None] | None = None) -> Collection:
    """The collection with its own encoder loaded (use_vectors=False: none, for BM25 alone).
    The default collection (Python's docs) is built on first use, and rebuilt when an older
    lmforge built it, so `lmforge ask` works on a fresh install."""
    folder = collections_root() / collection
    if collection == DEFAULT_COLLECTION and (folder / "collection.db").is_file():
        try:
            Collection.open(collection).close()
        except OldSchema:  # built by an older lmforge from Python's docs alone: rebuild it
            if not only_pydoc(folder):
                raise
            log("the default collection was built by an older lmforge; rebuilding it")
            shutil.rmtree(folder)
    if collection == DEFAULT_COLLECTION and not (folder / "collection.db").is_file():
        log("building the default collection from Python's documentation (once)")
        index(collection, None, progress=progress)
    with Collection.open(collection) as col:
        spec = col.embed_model
    encoder = None
    if spec is not None and use_vectors:
        from lmforge.encoders import Encoder

        encoder = Encoder.load(spec)
    return Collection.open(collection, encoder=encoder)


def needs_vectors(mode: str, rerank: str) -> bool:
    return mode != "bm25" or rerank == "encoder"


def list_collections() -> list[tuple[str, int, int]]:
    """(name, documents, chunks) of every collection."""
    root = collections_root()
    names = sorted(p.name for p in root.iterdir() if (p / "collection.db").is_file()) if root.is_dir() else []
    out = []
    for name in names:
        with Collection.open(name) as col:
            out.append((name, len(col.documents()), col.count_chunks()))
    return out


def documents(collection: str) -> list[tuple[str, int, int]]:
    """(source, characters, chunks) of every document in a collection."""
    with Collection.open(collection) as col:
        return list(col.documents())


def remove(collection: str, sources: list[str]) -> tuple[int, list[str]]:
    """Remove documents (a folder removes what lies under it); returns how many, and the
    search indexes rebuilt. Nothing matching is an error."""
    with Collection.open(collection) as col:
        n = col.remove(sources)
        built = col.refresh() if n else []
    if not n:
        raise LMForgeError(f"nothing in {collection!r} matches {', '.join(sources)}")
    return n, list(built or [])


def search(query: str, collection: str = DEFAULT_COLLECTION, k: int = 5, mode: str = "hybrid",
           dense_weight: float = 1.0, rerank: str = "none", lm=None, log: Log = _quiet):
    """The k best chunks for a query (reranked when asked: `lm` for rerank="llm")."""
    from lmforge.rag.rerank import pool_size, rerank as rerank_hits

    check_options(k, mode, rerank)
    if rerank == "llm" and lm is None:
        raise LMForgeError("--rerank llm needs a language model")
    with open_for_search(collection, needs_vectors(mode, rerank), log) as col:
        hits = col.search(query, pool_size(k, rerank), mode, dense_weight=dense_weight)
        return rerank_hits(query, hits, rerank, col.encoder, lm)[:k]


def ask(question: str, lm, collection: str = DEFAULT_COLLECTION, k: int = 3, mode: str = "hybrid",
        max_new_tokens: int = 200, dense_weight: float = 1.0, rerank: str = "none", on_text=None, log: Log = _quiet):
    """A grounded answer with numbered citations (see rag.ask.ask), from a collection by name."""
    from lmforge.rag.ask import ask as ask_fn

    check_options(k, mode, rerank)
    with open_for_search(collection, needs_vectors(mode, rerank), log) as col:
        return ask_fn(question, col, lm, k=k, mode=mode, max_new_tokens=max_new_tokens, rerank=rerank,
                      dense_weight=dense_weight, on_text=on_text)
