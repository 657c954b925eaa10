"""A collection of documents for retrieval: one folder, one SQLite database.

    collections/NAME/collection.db   documents, chunks and their FTS5 full-text index (BM25)

SQLite runs in WAL mode and every file is ingested in its own transaction, so a crash mid-ingest
leaves the collection as it was after the last whole file. A document is keyed by its path (or
`pydoc:TOPIC` for the built-in Python docs) and remembered with its content's sha256: adding an
unchanged file again does nothing, a changed one has its chunks replaced.

BM25 is FTS5's own (k1 = 1.2, b = 0.75) over Porter-stemmed, Unicode-folded tokens. With an
embedding model (a sentence encoder such as minilm-l6, fixed per collection at its first
embedded ingest), every chunk also gets a unit-length vector, stored beside it in the same
transaction; dense search is exact (one matrix product), and hybrid search fuses the BM25 and
dense rankings by reciprocal rank (score = sum of 1 / (rrf_k + rank)).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.rag.chunking import TEXT_SUFFIXES, chunk_text, read_document

SCHEMA_VERSION = 1
DEFAULT_COLLECTION = "pydoc"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,
    chars INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, heading TEXT NOT NULL,
    text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, seq);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    heading, text, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS vectors (
    chunk_id INTEGER PRIMARY KEY REFERENCES chunks(id) ON DELETE CASCADE, vec BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, heading, text) VALUES (new.id, new.heading, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, heading, text) VALUES ('delete', old.id, old.heading, old.text);
END;
"""


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
    words = re.findall(r"\w+", text.lower())
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


class Collection:
    def __init__(self, folder: Path, create: bool = False, encoder=None):
        """encoder: an lmforge.encoders.Encoder (or anything with `embed(texts) -> (n, d)` and a
        `spec` string naming it) for dense vectors; the collection remembers which one."""
        self.folder = Path(folder)
        self.name = self.folder.name
        self.encoder = encoder
        self._matrix: tuple[int, np.ndarray, np.ndarray] | None = None  # (version, chunk ids, vectors)
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
            self.db.executescript(_SCHEMA)
            version = self._meta("schema")
            if version is None:
                with self.db:
                    self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(version) != SCHEMA_VERSION:
                raise LMForgeError(f"collection {self.name!r} has schema {version}; this lmforge reads "
                                   f"{SCHEMA_VERSION}: rebuild it")
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

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

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
        pending: list[tuple[str, str, str, tuple | None, list]] = []

        def flush() -> None:
            texts = [c.text for *_, chunks in pending for c in chunks]
            vecs = self._embed(texts) if self.encoder is not None else None
            at = 0
            for source, text, sha, row, chunks in pending:
                self._write(source, text, sha, row, chunks, None if vecs is None else vecs[at:at + len(chunks)])
                at += len(chunks)
                if progress:
                    progress(source)
            pending.clear()

        for source, text in docs:
            sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
            row = self.db.execute("SELECT id, sha256 FROM documents WHERE source = ?", (source,)).fetchone()
            if row is not None and row[1] == sha:
                statuses.append("unchanged")
                if progress:
                    progress(source)
                continue
            statuses.append("added" if row is None else "updated")
            pending.append((source, text, sha, row, chunk_text(text, target, overlap)))
            if len(pending) >= batch:
                flush()
        flush()
        return statuses

    def _write(self, source: str, text: str, sha: str, row: tuple | None, chunks: list, vecs: np.ndarray | None) -> None:
        with self.db:  # one transaction: the old chunks go only if the new ones arrive
            if row is not None:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
                self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
            cur = self.db.execute("INSERT INTO documents (source, sha256, chars, added) VALUES (?, ?, ?, ?)",
                                  (source, sha, len(text), time.time()))
            doc_id = cur.lastrowid
            self.db.executemany('INSERT INTO chunks (doc_id, seq, start, "end", heading, text) VALUES (?, ?, ?, ?, ?, ?)',
                                [(doc_id, i, c.start, c.end, c.heading, c.text) for i, c in enumerate(chunks)])
            if vecs is not None:
                ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ? ORDER BY seq", (doc_id,))]
                self.db.executemany("INSERT INTO vectors VALUES (?, ?)", [(i, v.tobytes()) for i, v in zip(ids, vecs)])

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
                    (key, _like_prefix(key.rstrip("/") + "/")))]
                for i in ids:
                    self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (i,))
                    self.db.execute("DELETE FROM documents WHERE id = ?", (i,))
                n += len(ids)
        return n

    # ------------------------------------------------------------------ read
    def documents(self) -> list[tuple[str, int, int]]:
        """(source, characters, chunks) for every document."""
        return [tuple(r) for r in self.db.execute(
            "SELECT d.source, d.chars, COUNT(c.id) FROM documents d LEFT JOIN chunks c ON c.doc_id = d.id "
            "GROUP BY d.id ORDER BY d.source")]

    def count_chunks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids (n,), unit vectors (n, d)), cached until the database changes."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0] + self.db.total_changes
        if self._matrix is None or self._matrix[0] != version:
            rows = self.db.execute("SELECT chunk_id, vec FROM vectors ORDER BY chunk_id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1) \
                if rows else np.zeros((0, 1), dtype=np.float32)
            self._matrix = (version, ids, mat)
        return self._matrix[1], self._matrix[2]

    def _hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        marks = ",".join("?" * len(scored))
        rows = {r[0]: r for r in self.db.execute(
            f'SELECT c.id, d.source, c.heading, c.text, c.start, c."end" FROM chunks c '
            f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})", [i for i, _ in scored])}
        return [Hit(i, s, *rows[i][1:]) for i, s in scored if i in rows]

    def search_dense(self, query: str, k: int = 10) -> list[Hit]:
        """Cosine similarity to the query's embedding, exact over every chunk."""
        if self.encoder is None:
            raise LMForgeError("dense search needs an embedding model (minilm-l6, say)")
        ids, mat = self._vectors()
        if not len(ids):
            return []
        sims = mat @ self._embed([query])[0]  # (n,)
        top = np.argpartition(-sims, min(k, len(ids)) - 1)[:k]
        top = top[np.argsort(-sims[top])]
        return self._hits([(int(ids[i]), float(sims[i])) for i in top])

    def search_hybrid(self, query: str, k: int = 10, depth: int = 100, rrf_k: int = 60) -> list[Hit]:
        """Reciprocal rank fusion of the BM25 and dense top-`depth` lists."""
        fused: dict[int, float] = {}
        for hits in (self.search_bm25(query, depth), self.search_dense(query, depth)):
            for rank, h in enumerate(hits, 1):
                fused[h.chunk_id] = fused.get(h.chunk_id, 0.0) + 1.0 / (rrf_k + rank)
        best = sorted(fused.items(), key=lambda kv: -kv[1])[:k]
        return self._hits(best)

    def search(self, query: str, k: int = 10, mode: str = "hybrid") -> list[Hit]:
        if mode == "bm25" or (mode == "hybrid" and self.encoder is None):
            return self.search_bm25(query, k)
        if mode == "dense":
            return self.search_dense(query, k)
        if mode == "hybrid":
            return self.search_hybrid(query, k)
        raise LMForgeError(f"unknown search mode {mode!r}: use bm25, dense or hybrid")

    def search_bm25(self, query: str, k: int = 10) -> list[Hit]:
        q = fts_query(query)
        if not q:
            return []
        rows = self.db.execute(
            'SELECT c.id, -bm25(chunks_fts), d.source, c.heading, c.text, c.start, c."end" '
            "FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid JOIN documents d ON d.id = c.doc_id "
            "WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?", (q, k))
        return [Hit(*r) for r in rows]


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    return list(_expand(paths))


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files under the given paths (recursively; hidden entries, binaries and unknown kinds
    skipped in folders; a file named directly is always read)."""
    for p in map(Path, paths):
        if not p.exists():
            raise LMForgeError(f"no such file or folder: {p}")
        if p.is_file():
            yield p
            continue
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p).parts
            if not f.is_file() or any(part.startswith(".") for part in rel):
                continue
            if f.suffix.lower() in TEXT_SUFFIXES:
                with open(f, "rb") as fh:
                    if b"\0" not in fh.read(8192):
                        yield f
