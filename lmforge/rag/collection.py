"""A collection of documents for retrieval: one folder, one SQLite database, and the derived
search indexes that large collections use.

    collections/NAME/collection.db        documents, chunks (source, position, sha256), FTS5, vectors
    collections/NAME/bm25.npz             in-memory BM25 index (10,000+ chunks; lexical.py)
    collections/NAME/vectors-STAMP.usearch HNSW graph over the vectors (50,000+; ann.py, optional)

SQLite runs in WAL mode and every file is ingested in its own transaction, so a crash mid-ingest
leaves the collection as it was after the last whole file. A document is keyed by its path (or
`pydoc:TOPIC` for the built-in Python docs) and remembered with its content's sha256: adding an
unchanged file again does nothing, a changed one has its chunks replaced. Every write bumps a
change count; the derived files are stamped with it (and the collection's uid), so a stale or
damaged one is rebuilt from the database, never trusted, and each is written whole and renamed.

BM25 is FTS5's own (k1 = 1.2, b = 0.75) over Porter-stemmed, Unicode-folded tokens, CJK as
bigrams. With an embedding model (a sentence encoder such as minilm-l6, fixed per collection at
its first embedded ingest), every chunk also gets a unit-length vector, stored beside it in the
same transaction; dense search is exact (one matrix product) until the HNSW graph takes over,
and hybrid search fuses the BM25 and dense rankings by reciprocal rank
(score = 1 / (rrf_k + BM25 rank) + dense_weight / (rrf_k + dense rank)).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lmforge.errors import LMForgeError
from lmforge.rag.chunking import TEXT_SUFFIXES, chunk_text, pdf_support, read_document
from lmforge.rag.lexical import TOKENIZE, LexicalIndex, QueryTokenizer, fts_text, query_words

SCHEMA_VERSION = 3
DEFAULT_COLLECTION = "pydoc"
LEXICAL_FROM = 10_000  # chunks: from here BM25 runs on the in-memory index (FTS5 scores every match)
ANN_FROM = 50_000  # vectors: from here dense search uses an HNSW index (exact search passes ~10 ms)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,
    chars INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, heading TEXT NOT NULL,
    text TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_sha ON chunks(sha256);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, seq);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(heading, text, tokenize='%s');
CREATE TABLE IF NOT EXISTS vectors (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE, vec BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    DELETE FROM chunks_fts WHERE rowid = old.id;
END;
""" % TOKENIZE


class OldSchema(LMForgeError):
    """A collection written by another version of lmforge's storage layout."""


def only_pydoc(folder: Path) -> bool:
    """Whether a collection (of any schema version) holds nothing but Python's own docs, so
    that it can be rebuilt from them without asking."""
    import contextlib

    try:
        with contextlib.closing(sqlite3.connect(str(Path(folder) / "collection.db"))) as db:
            return db.execute("SELECT COUNT(*) FROM documents WHERE source NOT LIKE 'pydoc:%'").fetchone()[0] == 0
    except sqlite3.DatabaseError:
        return False


@dataclass
class Hit:
    chunk_id: int
    score: float  # higher is better
    source: str
    heading: str
    text: str
    start: int
    end: int


@dataclass
class AddReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    chunks: int = 0


def collections_root() -> Path:
    from lmforge.store import home

    return home() / "collections"


def _valid_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or ""):
        raise LMForgeError(f"bad collection name {name!r}: use letters, digits, '_', '-' or '.' (at most 64)")
    return name


def fts_query(text: str) -> str:
    """A user's question as an FTS5 query: its words, each quoted (FTS5 syntax characters in
    the text are then just text), joined by OR so that BM25 ranks partial matches too."""
    return " OR ".join(f'"{w}"' for w in query_words(text))


class Collection:
    def __init__(self, folder: Path, create: bool = False, encoder=None):
        """encoder: an lmforge.encoders.Encoder (or anything with `embed(texts) -> (n, d)` and a
        `spec` string naming it) for dense vectors; the collection remembers which one."""
        self.folder = Path(folder)
        self.name = self.folder.name
        self.encoder = encoder
        self.lexical_from, self.ann_from = LEXICAL_FROM, ANN_FROM
        self._matrix: tuple[str, np.ndarray, np.ndarray] | None = None  # (stamp, chunk ids, vectors)
        self._size: tuple[str, int] | None = None
        self._lex: LexicalIndex | None = None
        self._ann: tuple[str, object] | None = None
        self._tokenizer: QueryTokenizer | None = None
        self._last_query: tuple[str, np.ndarray] | None = None  # (text, unit vector)
        db = self.folder / "collection.db"
        if not db.is_file() and not create:
            how = "lmforge index add" if self.name == DEFAULT_COLLECTION else \
                f"lmforge index add PATHS --collection {self.name}"
            raise LMForgeError(f"no collection {self.name!r} (in {self.folder.parent}); build it with: {how}")
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(db))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # with WAL: safe against crashes, no fsync per commit
            self.db.execute("PRAGMA foreign_keys=ON")
            has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            version = self._meta("schema") if has_meta else None
            if version is not None and int(version) != SCHEMA_VERSION:  # checked before touching tables
                self.db.close()
                raise OldSchema(f"collection {self.name!r} has schema {version}; this lmforge reads "
                                f"{SCHEMA_VERSION}: delete {self.folder} and index again")
            self.db.executescript(_SCHEMA)
            if version is None:
                with self.db:  # uid + generation stamp the derived index files (bm25.npz, vectors-*.usearch)
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", [
                        ("schema", str(SCHEMA_VERSION)), ("uid", secrets.token_hex(6)), ("generation", "0")])
        except sqlite3.DatabaseError as e:
            raise LMForgeError(f"{db} is not a usable collection database ({e}); delete the folder and "
                               f"index again") from None

        if encoder is not None:
            self._check_encoder()

    @classmethod
    def open(cls, name: str = DEFAULT_COLLECTION, create: bool = False, root: Path | None = None,
             encoder=None) -> "Collection":
        return cls((root or collections_root()) / _valid_name(name), create=create, encoder=encoder)

    @property
    def embed_model(self) -> str | None:
        return self._meta("embed_model")

    def _check_encoder(self) -> None:
        spec, have = str(self.encoder.spec), self.embed_model
        if have is not None and have != spec:
            raise LMForgeError(f"collection {self.name!r} was embedded with {have!r}, not {spec!r}; use that "
                               f"model or re-index into a new collection")
        if have is None:
            with self.db:
                self.db.execute("INSERT INTO meta VALUES ('embed_model', ?)", (spec,))
            if self.count_chunks():  # chunks added before an encoder was given: embed them now
                rows = self.db.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
                vecs = self._embed([t for _, t in rows])
                with self.db:
                    self.db.executemany("INSERT INTO vectors VALUES (?, ?)",
                                        [(i, v.tobytes()) for (i, _), v in zip(rows, vecs)])
                    self._bump()

    def close(self) -> None:
        self._ann = self._lex = self._matrix = None  # the graph is memory-mapped: let the file go
        if self._tokenizer is not None:
            self._tokenizer.db.close()
            self._tokenizer = None
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _bump(self) -> None:
        """Count a change, inside the writer's transaction: derived indexes built before it are stale."""
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    @property
    def stamp(self) -> str:
        """Names this collection's current contents (its uid and change count)."""
        return f"{self._meta('uid')}-{self._meta('generation')}"

    # ------------------------------------------------------------------ ingest
    def add_text(self, source: str, text: str, target: int = 1000, overlap: int = 150) -> str:
        """Ingest one document: "added", "updated" or "unchanged"."""
        return self.add_documents([(source, text)], target, overlap)[0]

    def add_documents(self, docs: Iterable[tuple[str, str]], target: int = 1000, overlap: int = 150,
                      progress: Callable[[str], None] | None = None, batch: int = 64) -> list[str]:
        """Ingest (source, text) pairs; each one's status ("added", "updated", "unchanged") in
        order. Changed documents are chunked, and their chunks embedded `batch` documents at a
        time (one encoder call: length-bucketed batches across documents, not a call per
        document); each document is then written in its own transaction, vectors included."""
        statuses: list[str] = []
        pending: list[tuple[str, str, str, list]] = []  # (source, text, sha256, chunks)

        def flush() -> None:
            texts = [c.text for *_, chunks in pending for c in chunks]
            vecs = self._embed(texts) if self.encoder is not None else None
            at = 0
            for source, text, sha, chunks in pending:
                self._write(source, text, sha, chunks, None if vecs is None else vecs[at:at + len(chunks)])
                at += len(chunks)
                if progress:
                    progress(source)
            pending.clear()

        seen: set[str] = set()
        for source, text in docs:
            if source in seen:  # named twice in one call (a folder and a file in it): once is enough
                statuses.append("unchanged")
                if progress:
                    progress(source)
                continue
            seen.add(source)
            sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
            row = self.db.execute("SELECT id, sha256 FROM documents WHERE source = ?", (source,)).fetchone()
            if row is not None and row[1] == sha:
                statuses.append("unchanged")
                if progress:
                    progress(source)
                continue
            statuses.append("added" if row is None else "updated")
            pending.append((source, text, sha, chunk_text(text, target, overlap)))
            if len(pending) >= batch:
                flush()
        flush()
        return statuses

    def _write(self, source: str, text: str, sha: str, chunks: list, vecs: np.ndarray | None) -> None:
        with self.db:  # one transaction: the old chunks go only if the new ones arrive
            # looked up inside it: another process may have added this source since add_documents looked
            row = self.db.execute("SELECT id, sha256 FROM documents WHERE source = ?", (source,)).fetchone()
            if row is not None:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
                self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
            cur = self.db.execute("INSERT INTO documents (source, sha256, chars, added) VALUES (?, ?, ?, ?)",
                                  (source, sha, len(text), time.time()))
            doc_id = cur.lastrowid
            self.db.executemany('INSERT INTO chunks (doc_id, seq, start, "end", heading, text, sha256) '
                                'VALUES (?, ?, ?, ?, ?, ?, ?)',
                                [(doc_id, i, c.start, c.end, c.heading, c.text,
                                  hashlib.sha256(c.text.encode("utf-8")).hexdigest()) for i, c in enumerate(chunks)])
            ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ? ORDER BY seq", (doc_id,))]
            self.db.executemany("INSERT INTO chunks_fts (rowid, heading, text) VALUES (?, ?, ?)",
                                [(i, fts_text(c.heading), fts_text(c.text)) for i, c in zip(ids, chunks)])
            if vecs is not None:
                self.db.executemany("INSERT INTO vectors VALUES (?, ?)", [(i, v.tobytes()) for i, v in zip(ids, vecs)])
            self._bump()

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        v = np.asarray(self.encoder.embed(texts), dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # (n, d) unit rows

    def add_paths(self, paths: Iterable[str | Path], target: int = 1000, overlap: int = 150,
                  progress: Callable[[str], None] | None = None) -> AddReport:
        files = expand_paths(paths)  # every path checked before anything is written
        statuses = self.add_documents(((str(f.resolve()), read_document(f)) for f in files), target, overlap, progress)
        return self._report(statuses)

    def add_pydoc(self, target: int = 1000, overlap: int = 150,
                  progress: Callable[[str], None] | None = None) -> AddReport:
        """Python's own documentation topics (pydoc_data.topics), one document per topic."""
        from pydoc_data.topics import topics

        statuses = self.add_documents(((f"pydoc:{n}", topics[n]) for n in sorted(topics)), target, overlap, progress)
        return self._report(statuses)

    def _report(self, statuses: list[str]) -> AddReport:
        r = AddReport(chunks=self.count_chunks())
        for st in statuses:
            setattr(r, st, getattr(r, st) + 1)
        return r

    def remove(self, sources: Iterable[str]) -> int:
        n = 0
        with self.db:
            for s in sources:
                key = s if s.startswith("pydoc:") or not Path(s).exists() else str(Path(s).resolve())
                ids = [r[0] for r in self.db.execute(
                    "SELECT id FROM documents WHERE source = ? OR source LIKE ? ESCAPE '\\'",
                    (key, _like_prefix(key.rstrip("/" + os.sep) + os.sep)))]
                for i in ids:
                    self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (i,))
                    self.db.execute("DELETE FROM documents WHERE id = ?", (i,))
                n += len(ids)
            if n:
                self._bump()
        return n

    # ------------------------------------------------------------------ read
    def documents(self) -> list[tuple[str, int, int]]:
        """(source, characters, chunks) for every document."""
        return [tuple(r) for r in self.db.execute(
            "SELECT d.source, d.chars, COUNT(c.id) FROM documents d LEFT JOIN chunks c ON c.doc_id = d.id "
            "GROUP BY d.id ORDER BY d.source")]

    def count_chunks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def size(self) -> int:
        """Number of chunks, cached until the collection changes."""
        stamp = self.stamp
        if self._size is None or self._size[0] != stamp:
            self._size = (stamp, self.count_chunks())
        return self._size[1]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids (n,), unit vectors (n, d)), cached until the collection changes."""
        stamp = self.stamp
        if self._matrix is None or self._matrix[0] != stamp:
            rows = self.db.execute("SELECT chunk_id, vec FROM vectors ORDER BY chunk_id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = np.frombuffer(bytearray(b"".join(r[1] for r in rows)), dtype=np.float32).reshape(len(rows), -1) \
                if rows else np.zeros((0, 1), dtype=np.float32)
            self._matrix = (stamp, ids, mat)
        return self._matrix[1], self._matrix[2]

    # ------------------------------------------------------------------ derived indexes
    def uses_lexical_index(self) -> bool:
        return self.size() >= self.lexical_from

    def uses_ann(self) -> bool:
        from lmforge.rag import ann

        return self.encoder is not None and self.size() >= self.ann_from and ann.available()

    def _lexical(self) -> LexicalIndex:
        """The in-memory BM25 index: loaded from bm25.npz, or rebuilt (and saved) when stale."""
        if self._lex is not None and self._lex.stamp == self.stamp:
            return self._lex
        self.db.execute("BEGIN")  # one read snapshot: stamp, vocabulary and postings agree
        try:
            stamp = self.stamp
            path = self.folder / "bm25.npz"
            lex = LexicalIndex.load(path, stamp)
            if lex is None:
                lex = LexicalIndex.build(self.db, stamp)
                try:
                    lex.save(path)
                except OSError:  # a read-only collection folder: use it from memory only
                    pass
        finally:
            self.db.rollback()
        self._lex = lex
        return lex

    def _ann_index(self):
        """The HNSW index over the vectors (vectors-STAMP.usearch), rebuilt when stale."""
        from lmforge.rag import ann

        stamp = self.stamp
        if self._ann is None or self._ann[0] != stamp:
            path = self.folder / f"vectors-{stamp}.usearch"
            index = ann.load(path)
            if index is None:
                self.db.execute("BEGIN")  # one read snapshot: the stamp names exactly these vectors
                try:
                    stamp = self.stamp
                    path = self.folder / f"vectors-{stamp}.usearch"
                    ids, mat = self._vectors()
                finally:
                    self.db.rollback()
                index = ann.build(ids, mat)
                try:
                    ann.save(index, path)
                    for old in self.folder.glob("vectors-*.usearch"):
                        if old != path:
                            old.unlink(missing_ok=True)
                except OSError:  # a read-only collection folder: use it from memory only
                    pass
            self._ann = (stamp, index)
        return self._ann[1]

    def refresh(self) -> list[str]:
        """Build the derived indexes a collection of this size searches with, if they are stale,
        so that the first query does not pay for it; names what was built."""
        built = []
        if self.uses_lexical_index() and (self._lex is None or self._lex.stamp != self.stamp):
            self._lexical()
            built.append("bm25")
        if self.uses_ann() and (self._ann is None or self._ann[0] != self.stamp):
            self._ann_index()
            built.append("ann")
        return built

    # ------------------------------------------------------------------ search
    def _hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        marks = ",".join("?" * len(scored))
        rows = {r[0]: r for r in self.db.execute(
            f'SELECT c.id, d.source, c.heading, c.text, c.start, c."end" FROM chunks c '
            f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})", [i for i, _ in scored])}
        return [Hit(i, s, *rows[i][1:]) for i, s in scored if i in rows]

    def _bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the k best chunks: FTS5's bm25() over an OR of the query's
        words, or the same scores from the in-memory index on large collections."""
        words = query_words(query)
        if not words or k <= 0:
            return []
        if self.uses_lexical_index():
            if self._tokenizer is None:
                self._tokenizer = QueryTokenizer()
            phrases = self._tokenizer.terms(words)
            if all(len(p) == 1 for p in phrases):  # else a multi-token phrase: FTS5 matches it as one
                return self._lexical().search(phrases, k)
        return self.db.execute("SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                               "ORDER BY bm25(chunks_fts) LIMIT ?", (fts_query(query), k)).fetchall()

    def _dense(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the k nearest chunks: exact, or HNSW on large collections."""
        if self.encoder is None:
            raise LMForgeError("dense search needs an embedding model (minilm-l6, say)")
        if self.size() == 0 or k <= 0:
            return []
        if self._last_query is None or self._last_query[0] != query:  # ask() searches twice per question
            self._last_query = (query, self._embed([query])[0])
        q = self._last_query[1]  # (d,)
        if self.uses_ann():
            return self._ann_index().search(q, k)
        ids, mat = self._vectors()
        if not len(ids):
            return []
        # torch, not numpy: numpy's BLAS threads and torch's (the encoder just ran) spin against
        # each other on a small machine, costing milliseconds per query
        sims = torch.mv(torch.from_numpy(mat), torch.from_numpy(q)).numpy()  # (n,)
        top = np.argpartition(-sims, min(k, len(ids)) - 1)[:k]
        top = top[np.argsort(-sims[top])]
        return [(int(ids[i]), float(sims[i])) for i in top]

    def _hybrid(self, query: str, k: int, depth: int = 100, rrf_k: int = 60,
                dense_weight: float = 1.0) -> list[tuple[int, float]]:
        fused: dict[int, float] = {}
        for weight, ranked in ((1.0, self._bm25(query, depth)), (dense_weight, self._dense(query, depth))):
            for rank, (i, _) in enumerate(ranked, 1):
                fused[i] = fused.get(i, 0.0) + weight / (rrf_k + rank)
        return sorted(fused.items(), key=lambda kv: -kv[1])[:k]

    def search_bm25(self, query: str, k: int = 10) -> list[Hit]:
        return self._hits(self._bm25(query, k))

    def search_dense(self, query: str, k: int = 10) -> list[Hit]:
        """Cosine similarity to the query's embedding (exact below ann_from vectors)."""
        return self._hits(self._dense(query, k))

    def search_hybrid(self, query: str, k: int = 10, depth: int = 100, rrf_k: int = 60,
                      dense_weight: float = 1.0) -> list[Hit]:
        """Reciprocal rank fusion of the BM25 and dense top-`depth` lists: a chunk scores
        1 / (rrf_k + its BM25 rank) + dense_weight / (rrf_k + its dense rank). A smaller rrf_k
        favours the lists' leaders; dense_weight < 1 trusts BM25 more (an encoder that does not
        know the collection's language), > 1 trusts the encoder more."""
        return self._hits(self._hybrid(query, k, depth, rrf_k, dense_weight))

    def search(self, query: str, k: int = 10, mode: str = "hybrid", rrf_k: int = 60,
               dense_weight: float = 1.0) -> list[Hit]:
        if mode == "bm25" or (mode == "hybrid" and self.encoder is None):
            return self.search_bm25(query, k)
        if mode == "dense":
            return self.search_dense(query, k)
        if mode == "hybrid":
            return self.search_hybrid(query, k, rrf_k=rrf_k, dense_weight=dense_weight)
        raise LMForgeError(f"unknown search mode {mode!r}: use bm25, dense or hybrid")


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The files to read, each once (a file named beside its folder is not read twice)."""
    return list({f.resolve(): f for f in _expand(paths)}.values())


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files under the given paths (recursively; hidden entries, binaries and unknown kinds
    skipped in folders; a file named directly is always read)."""
    for p in map(Path, paths):
        if not p.exists():
            raise LMForgeError(f"no such file or folder: {p}")
        if p.is_file():
            yield p
            continue
        if not p.is_dir():  # a device, a pipe, a socket (or a link to one): nothing to index
            raise LMForgeError(f"{p} is not a regular file or a folder")
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p).parts
            if not f.is_file() or any(part.startswith(".") for part in rel):
                continue
            if f.suffix.lower() == ".pdf" and pdf_support():  # without the extra, folders skip PDFs
                yield f
            elif f.suffix.lower() in TEXT_SUFFIXES:
                with open(f, "rb") as fh:
                    if b"\0" not in fh.read(8192):
                        yield f
