"""BM25 for large collections: FTS5's own scores, from an in-memory inverted index.

FTS5 computes bm25() for every chunk that matches any query word, about a microsecond each,
so an OR query over 100,000 chunks costs 100+ ms. This index keeps, per term, the positions of
the chunks that contain it and each posting's finished score contribution (the term's idf times
its saturated frequency), so a query is a few array slices and one bincount.

It is built from FTS5's own token index (the fts5vocab views), so tokenization is defined once,
and the formula is FTS5's: k1 = 1.2, b = 0.75, idf = ln((N - n + 0.5) / (n + 0.5)) floored at
1e-6, term frequency summed over the heading and text columns, document length in tokens over
both. Tests hold its scores equal to bm25() itself.

Text goes into FTS5 through `fts_text`, which splits runs of CJK characters into overlapping
bigrams: unicode61 would otherwise index a whole Chinese sentence as one token.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

K1, B = 1.2, 0.75
TOKENIZE = "porter unicode61 remove_diacritics 2"

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
# unicode61's token characters: letters, digits and combining marks ("İ".lower() is "i" + U+0307);
# '_' separates
_WORD = re.compile(r"(?:[^\W_]|[\u0300-\u036f])+")


def _bigrams(m: re.Match) -> str:
    run = m.group(0)
    grams = [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
    return " " + " ".join(grams) + " "


def fts_text(text: str) -> str:
    """Text as FTS5 indexes it: CJK runs become space-separated overlapping bigrams."""
    return _CJK.sub(_bigrams, text)


def query_words(text: str) -> list[str]:
    """A query's distinct words (lower-cased, CJK as bigrams), in order: one FTS5 phrase each."""
    return list(dict.fromkeys(_WORD.findall(fts_text(text).lower())))


class QueryTokenizer:
    """FTS5's tokenizer applied to query words (a throwaway in-memory FTS5 table whose rows are
    inserted and rolled back), so that query terms are stemmed exactly as the index was."""

    def __init__(self):
        self.lock = threading.Lock()  # its BEGIN/ROLLBACK must not interleave between threads
        self.db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.db.execute(f"CREATE VIRTUAL TABLE w USING fts5(x, tokenize='{TOKENIZE}')")
        self.db.execute("CREATE VIRTUAL TABLE wv USING fts5vocab(w, instance)")

    def terms(self, words: list[str]) -> list[list[str]]:
        """The FTS5 terms of each word (usually exactly one)."""
        out: list[list[str]] = [[] for _ in words]
        with self.lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT INTO w(rowid, x) VALUES (?, ?)", enumerate(words))
                for doc, term in self.db.execute("SELECT doc, term FROM wv ORDER BY doc, offset"):
                    out[doc].append(term)
            finally:
                self.db.execute("ROLLBACK")
        return out


@dataclass
class LexicalIndex:
    stamp: str  # the collection state it was built from
    terms: dict[str, int]  # term -> row in indptr
    indptr: np.ndarray  # (T + 1,) int64: postings of term t are [indptr[t], indptr[t + 1])
    rows: np.ndarray  # (P,) int32: position of the posting's chunk in chunk_ids
    weights: np.ndarray  # (P,) float32: idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * D / avgdl))
    chunk_ids: np.ndarray  # (N,) int64

    @classmethod
    def build(cls, db: sqlite3.Connection, stamp: str, table: str = "chunks_fts") -> "LexicalIndex":
        db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_terms USING fts5vocab(main, {table}, row)")
        db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_inst USING fts5vocab(main, {table}, instance)")
        vocab = db.execute(f"SELECT term, doc FROM temp.{table}_terms ORDER BY term").fetchall()
        # one row per (term, chunk) with the term's count there, in the same term order
        post = np.array(db.execute(f"SELECT doc, COUNT(*) FROM temp.{table}_inst GROUP BY term, doc "
                                   f"ORDER BY term, doc").fetchall(), dtype=np.int64).reshape(-1, 2)
        df = np.array([d for _, d in vocab], dtype=np.int64)
        if int(df.sum()) != len(post):
            raise RuntimeError("FTS5 vocabulary and postings disagree")
        n_rows = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        chunk_ids, rows = np.unique(post[:, 0], return_inverse=True)
        tf = post[:, 1].astype(np.float64)
        length = np.bincount(rows, tf, minlength=len(chunk_ids))  # tokens per chunk, both columns
        avgdl = length.sum() / max(n_rows, 1)
        idf = np.maximum(np.log((n_rows - df + 0.5) / (df + 0.5)), 1e-6)
        norm = K1 * (1 - B + B * length[rows] / max(avgdl, 1e-9))
        weights = np.repeat(idf, df) * tf * (K1 + 1) / (tf + norm)
        indptr = np.zeros(len(df) + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        return cls(stamp, {t: i for i, (t, _) in enumerate(vocab)}, indptr, rows.astype(np.int32),
                   weights.astype(np.float32), chunk_ids)

    def search(self, phrases: list[list[str]], k: int) -> list[tuple[int, float]]:
        """(chunk id, score) of the k best chunks for phrases of one term each (as FTS5 scores an
        OR query: each phrase adds its own term's contribution, repeats included)."""
        slices = [(self.indptr[t], self.indptr[t + 1]) for p in phrases
                  if len(p) == 1 and (t := self.terms.get(p[0])) is not None]
        if not slices or k <= 0:
            return []
        idx = np.concatenate([self.rows[a:b] for a, b in slices])
        w = np.concatenate([self.weights[a:b] for a, b in slices])
        scores = np.bincount(idx, w, minlength=len(self.chunk_ids))  # (N,)
        hit = np.flatnonzero(scores)
        if len(hit) > k:
            hit = hit[np.argpartition(-scores[hit], k - 1)[:k]]
        hit = hit[np.lexsort((self.chunk_ids[hit], -scores[hit]))]
        return [(int(self.chunk_ids[i]), float(scores[i])) for i in hit]

    # ------------------------------------------------------------------ files
    def save(self, path: Path) -> None:
        tmp = Path(f"{path}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:  # written whole, then renamed over the old one
                np.savez(f, stamp=np.array(self.stamp), terms=np.frombuffer("\0".join(self.terms).encode(), np.uint8),
                         indptr=self.indptr, rows=self.rows, weights=self.weights, chunk_ids=self.chunk_ids)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, stamp: str) -> "LexicalIndex | None":
        """The saved index if it exists, is readable and matches `stamp`; else None."""
        try:
            with np.load(path) as z:
                if str(z["stamp"]) != stamp:
                    return None
                words = z["terms"].tobytes().decode().split("\0") if z["terms"].size else []
                return cls(stamp, {t: i for i, t in enumerate(words)}, z["indptr"], z["rows"], z["weights"],
                           z["chunk_ids"])
        except (OSError, ValueError, KeyError, UnicodeDecodeError):
            return None
