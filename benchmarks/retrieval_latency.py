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
    from lmforge.rag.collection import Collection

    words = re.findall(r"[a-z]{3,}", " ".join(topics.values()).lower())
    vocab, counts = np.unique(words, return_counts=True)
    p = counts / counts.sum()
    rng = np.random.default_rng(0)
    enc = Encoder.load(args.embed, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        col = Collection(Path(tmp) / "big", create=True)
        t = time.perf_counter()
        per_doc = 50
        with col.db:
            for d in range(args.chunks // per_doc):
                cur = col.db.execute("INSERT INTO documents (source, sha256, chars, added) VALUES (?, '', 0, 0)",
                                     (f"doc{d}",))
                rows = [(cur.lastrowid, i, 0, 0, "", " ".join(rng.choice(vocab, 60, p=p)))
                        for i in range(per_doc)]
                col.db.executemany('INSERT INTO chunks (doc_id, seq, start, "end", heading, text) '
                                   'VALUES (?, ?, ?, ?, ?, ?)', rows)
            ids = [r[0] for r in col.db.execute("SELECT id FROM chunks")]
            vecs = rng.standard_normal((len(ids), enc.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            col.db.executemany("INSERT INTO vectors VALUES (?, ?)", [(i, v.tobytes()) for i, v in zip(ids, vecs)])
            col.db.execute("INSERT INTO meta VALUES ('embed_model', ?)", (enc.spec,))
        print(f"built a {len(ids):,}-chunk collection in {time.perf_counter() - t:.1f} s")
        col.close()
        col = Collection(Path(tmp) / "big", encoder=enc)
        qrng = random.Random(1)
        sentences = [s.strip() for t in topics.values() for s in re.split(r"(?<=[.?!])\s+", t) if 30 < len(s) < 160]
        queries = qrng.sample(sentences, args.queries)
        col.search(queries[0], 10, "hybrid")  # load the vectors once, as a long-running server would
        for mode in ("bm25", "dense", "hybrid"):
            times = []
            for q in queries:
                t = time.perf_counter()
                col.search(q, 10, mode)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            print(f"{mode:7} p50 {times[len(times) // 2]:7.1f} ms   p95 {times[int(len(times) * 0.95)]:7.1f} ms   "
                  f"max {times[-1]:7.1f} ms")


if __name__ == "__main__":
    main()
