"""Hybrid search latency over a large synthetic collection (issue #5: 100,000 chunks, p50 < 30 ms,
p95 < 100 ms, query embedding included).

    lmforge pull minilm-l6
    python benchmarks/retrieval_latency.py --chunks 100000

Chunk texts are sentences of words drawn (Zipf-like) from Python's own documentation; chunk
vectors are random unit vectors written straight into the collection (embedding 100,000 real
chunks would take most of an hour here, and search cost does not depend on the vectors' values).
Queries are real: 200 sentences embedded by MiniLM at query time, as `lmforge search` does.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--embed", default="minilm-l6")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from pydoc_data.topics import topics

    from lmforge.encoders import Encoder
    from lmforge.rag.chunking import Chunk
    from lmforge.rag.collection import Collection, fts_query

    words = re.findall(r"[a-z]{3,}", " ".join(topics.values()).lower())
    vocab, counts = np.unique(words, return_counts=True)
    p = counts / counts.sum()
    rng = np.random.default_rng(0)
    enc = Encoder.load(args.embed, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        col = Collection(Path(tmp) / "big", create=True)
        col.db.execute("INSERT INTO meta VALUES ('embed_model', ?)", (enc.spec,))
        col.db.commit()
        t = time.perf_counter()
        per_doc = 50
        for d in range(args.chunks // per_doc):
            chunks = [Chunk(" ".join(rng.choice(vocab, 60, p=p)), 0, 0) for _ in range(per_doc)]
            vecs = rng.standard_normal((per_doc, enc.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            col._write(f"doc{d}", "", "", chunks, vecs)
        print(f"built a {col.size():,}-chunk collection in {time.perf_counter() - t:.1f} s")
        col.close()
        col = Collection(Path(tmp) / "big", encoder=enc)
        for name, fn in (("bm25 index", col._lexical), ("HNSW index", col._ann_index)):
            t = time.perf_counter()
            fn()
            print(f"{name} built in {time.perf_counter() - t:.1f} s")
        qrng = random.Random(1)
        sentences = [s.strip() for t in topics.values() for s in re.split(r"(?<=[.?!])\s+", t) if 30 < len(s) < 160]
        queries = qrng.sample(sentences, args.queries)
        col.search(queries[0], 10, "hybrid")  # vectors and indexes in memory, as a long-running server has them

        def small(c):  # the same collection searched as a small one is: FTS5 bm25() and exact dense
            c.lexical_from = c.ann_from = 10**12

        def large(c):
            c.lexical_from = c.ann_from = 0

        rows = [("query embedding alone", None, lambda q: enc.embed([q])),
                ("bm25: FTS5 bm25()", small, lambda q: col.search(q, 10, "bm25")),
                ("bm25: in-memory index", large, lambda q: col.search(q, 10, "bm25")),
                ("dense: exact", small, lambda q: col.search(q, 10, "dense")),
                ("dense: HNSW", large, lambda q: col.search(q, 10, "dense")),
                ("hybrid: FTS5 + exact", small, lambda q: col.search(q, 10, "hybrid")),
                ("hybrid: index + HNSW (default)", large, lambda q: col.search(q, 10, "hybrid"))]
        print(f"\n| {len(queries)} queries over {col.size():,} chunks | p50 ms | p95 ms | max ms |")
        print("|---|---|---|---|")
        for name, setup, fn in rows:
            if setup:
                setup(col)
            fn(queries[0])
            times = []
            for q in queries:
                t = time.perf_counter()
                fn(q)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            print(f"| {name} | {times[len(times) // 2]:.1f} | {times[int(len(times) * 0.95)]:.1f} | {times[-1]:.1f} |")
        large(col)
        same_ids = same_scores = 0
        for q in queries[:50]:
            fast = col._bm25(q, 10)
            ref = col.db.execute("SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                                 "ORDER BY bm25(chunks_fts) LIMIT 10", (fts_query(q),)).fetchall()
            same_ids += [i for i, _ in fast] == [i for i, _ in ref]
            same_scores += np.allclose([s for _, s in fast], [s for _, s in ref], rtol=1e-5)
        print(f"\nin-memory BM25 vs FTS5 bm25(), 50 queries: same top-10 scores on {same_scores}, "
              f"same top-10 ids in the same order on {same_ids} (equal scores may be ordered either way)")


if __name__ == "__main__":
    main()
