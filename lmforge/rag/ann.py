"""Approximate nearest neighbours for large collections: an HNSW graph from usearch.

Exact search reads every vector per query (100,000 x 384 floats is ~10 ms here); the graph
visits a few thousand. Vectors are unit length, so inner product is cosine. Stored as float16
(half the memory; cosines change by ~1e-3). usearch is optional (`pip install lmforge[ann]`):
without it, large collections are searched exactly, just more slowly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CONNECTIVITY = 16  # graph degree
EXPANSION_ADD = 128  # candidate list while building: better graph, slower build
EXPANSION_SEARCH = 128  # candidate list per query: at least hybrid search's depth of 100


def available() -> bool:
    try:
        import usearch.index  # noqa: F401
    except ImportError:
        return False
    return True


class AnnIndex:
    def __init__(self, index):
        self.index = index

    def search(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine) of about the k nearest vectors to the unit vector q, best first."""
        m = self.index.search(np.asarray(q, dtype=np.float32), k)
        return [(int(key), 1.0 - float(d)) for key, d in zip(m.keys, m.distances)]  # ip distance = 1 - cosine

    def __len__(self) -> int:
        return len(self.index)


def build(ids: np.ndarray, vectors: np.ndarray, threads: int | None = None) -> AnnIndex:
    from usearch.index import Index

    from lmforge.common import cpu_threads

    index = Index(ndim=vectors.shape[1], metric="ip", dtype="f16", connectivity=CONNECTIVITY,
                  expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)
    if len(ids):
        index.add(np.asarray(ids, dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32),
                  threads=threads or cpu_threads())
    return AnnIndex(index)


def save(index: AnnIndex, path: Path) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        index.index.save(str(tmp))  # whole file first, then renamed into place
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> AnnIndex | None:
    """The index saved at path, memory-mapped; None if missing or unreadable."""
    if not Path(path).is_file():
        return None
    from usearch.index import Index

    try:
        index = Index.restore(str(path), view=True)
    except Exception:  # a damaged file is rebuilt from the database, never trusted
        return None
    if index is None:
        return None
    index.expansion_search = EXPANSION_SEARCH
    return AnnIndex(index)
