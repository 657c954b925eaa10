"""Retrieval quality and index build time on SciFact (BEIR format, ../shared/data/retrieval/scifact).

    lmforge pull minilm-l6
    python benchmarks/retrieval.py                     # train claims (the test claims are kept aside)
    python benchmarks/retrieval.py --split test --beir PATH_TO_SCIFACT_WITH_TEST_QRELS
    python benchmarks/retrieval.py --rerank encoder    # plus hybrid's top 20 reranked (or --rerank llm)
    python benchmarks/retrieval.py --large-paths       # plus the in-memory BM25 index and HNSW, forced

Each abstract is one chunk; BM25 is SQLite FTS5's over Porter-stemmed words, dense is
all-MiniLM-L6-v2 (lmforge's encoder, float), hybrid is reciprocal-rank fusion of the two
top-100 lists (rrf_k = 60). Published nDCG@10 on SciFact's test claims: BM25 about 0.665,
all-MiniLM-L6-v2 about 0.645.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "retrieval" / "scifact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beir", type=Path, default=DATA)
    ap.add_argument("--split", default="train")
    ap.add_argument("--embed", default="minilm-l6", help="sentence encoder ('none': BM25 only)")
    ap.add_argument("--max-queries", type=int)
    ap.add_argument("--rerank", default="none", choices=("none", "encoder", "llm"),
                    help="also score hybrid's top --candidates reordered by this reranker")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--large-paths", action="store_true",
                    help="also score the in-memory BM25 index and the HNSW graph (what 10k+/50k+ chunk collections use)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the LLM reranker's model")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from lmforge.encoders import Encoder
    from lmforge.rag.evaluate import evaluate_beir

    enc = None if args.embed == "none" else Encoder.load(args.embed, device="cpu")
    lm = None
    if args.rerank == "llm":
        from lmforge.api import LM

        lm = LM.load(args.model)
    r = evaluate_beir(args.beir, args.split, enc, max_queries=args.max_queries, rerank=args.rerank, lm=lm,
                      candidates=args.candidates, large_paths=args.large_paths)
    info = r.pop("_")
    print(f"\n{args.beir.name} ({args.split} split): {info['documents']:,} documents, {info['queries']:,} queries; "
          f"index built in {info['index_seconds']:.1f} s (BM25 + vectors)")
    cols = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "ms_per_query")
    print(f"{'mode':20}" + "".join(f"{c:>14}" for c in cols))
    for mode, m in r.items():
        print(f"{mode:20}" + "".join(f"{m[c]:>14.4f}" if c != "ms_per_query" else f"{m[c]:>14.1f}" for c in cols))


if __name__ == "__main__":
    main()
