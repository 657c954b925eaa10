"""Sentence-embedding speed and parity: lmforge (float and int8) beside sentence-transformers,
same weights (all-MiniLM-L6-v2 from the store), same 1,000 sentences, batch 32, 2 threads.

    lmforge pull minilm-l6
    pip install sentence-transformers        # the peer (a test/benchmark extra)
    python benchmarks/embed.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentences(n: int) -> list[str]:
    """English sentences from Python's docs, mixed with Chinese hotel reviews when ../shared has them."""
    import pydoc_data.topics as topics

    english = [s.strip() for t in topics.topics.values() for s in t.replace("\n", " ").split(". ")
               if 40 < len(s.strip()) < 160]
    chinese: list[str] = []
    csv = ROOT.parent / "shared" / "data" / "classify" / "chnsenticorp_htl.csv"
    if csv.is_file():
        rows = csv.read_text(encoding="utf-8").splitlines()[1:]
        chinese = [r.split(",", 1)[1][:60] for r in rows if "," in r][: n // 10]
    out = chinese + english
    return out[:n]


def timed(fn, texts, repeats: int = 2) -> tuple[float, np.ndarray]:
    fn(texts[:64])  # warm-up
    best, vecs = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        vecs = fn(texts)
        best = min(best, time.perf_counter() - t)
    return len(texts) / best, np.asarray(vecs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from lmforge import store
    from lmforge.encoders import Encoder

    found = store.find("minilm-l6")
    if found is None:
        raise SystemExit("minilm-l6 is not pulled; run: lmforge pull minilm-l6")
    texts = sentences(args.n)
    enc = Encoder.load("minilm-l6", device="cpu")
    tokens = np.mean([len(t) for t in enc.tokenize(texts)])
    print(f"{len(texts)} sentences, {tokens:.1f} tokens on average, batch {args.batch_size}, 2 threads")
    rows = {}
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(found.path), device="cpu")
        rows["sentence-transformers"] = timed(lambda x: st.encode(x, batch_size=args.batch_size), texts)
    except ImportError:
        rows["sentence-transformers"] = None
    rows["lmforge (float)"] = timed(lambda x: enc.embed(x, batch_size=args.batch_size), texts)
    q = Encoder.load("minilm-l6", device="cpu", quantize="int8")
    rows["lmforge (int8)"] = timed(lambda x: q.embed(x, batch_size=args.batch_size), texts)
    peer = rows["sentence-transformers"]
    print(f"{'engine':24}{'sentences/s':>14}{'vs peer':>10}{'min cosine':>12}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:24}{'not installed':>14}")
            continue
        rate, vecs = r
        ratio = f"{rate / peer[0]:.2f}x" if peer else "-"
        cos = "-"
        if peer:
            ref = peer[1]
            c = (vecs * ref).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
            cos = f"{c.min():.6f}"
        print(f"{name:24}{rate:>14.1f}{ratio:>10}{cos:>12}")


if __name__ == "__main__":
    main()
