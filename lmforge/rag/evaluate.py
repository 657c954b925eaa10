"""Retrieval quality on a BEIR-format dataset: corpus.jsonl[.gz], queries.jsonl, qrels/SPLIT.tsv.

Each corpus document becomes one chunk (title, blank line, text), so rankings are of documents,
as in the published BEIR figures; the encoder truncates it at its own token limit. Metrics per
mode: recall@1/5/10, MRR@10 and nDCG@10 (graded relevance, log2 discount), averaged over the
queries that have judgements.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

from lmforge.errors import LMForgeError
from lmforge.rag.collection import Collection

ONE_CHUNK = 10_000_000  # a chunk size no abstract reaches


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"cannot read {path} as JSON lines ({e})") from None


def load_beir(folder: Path, split: str = "test") -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus id -> text, query id -> text, query id -> {doc id: relevance})."""
    folder = Path(folder)
    corpus_path = next((folder / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (folder / n).is_file()), None)
    if corpus_path is None or not (folder / "queries.jsonl").is_file() or not (folder / "qrels" / f"{split}.tsv").is_file():
        raise LMForgeError(f"{folder} is not a BEIR folder with split {split!r} (needs corpus.jsonl[.gz], "
                           f"queries.jsonl and qrels/{split}.tsv)")
    corpus = {str(d["_id"]): (d.get("title", "") + "\n\n" + d.get("text", "")).strip() for d in _jsonl(corpus_path)}
    queries = {str(q["_id"]): q["text"] for q in _jsonl(folder / "queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if int(row["score"]) > 0:
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    qrels = {q: r for q, r in qrels.items() if q in queries}
    if not qrels:
        raise LMForgeError(f"no judged queries in {folder / 'qrels' / (split + '.tsv')}")
    return corpus, queries, qrels


def metrics(ranked: list[str], relevant: dict[str, int]) -> dict[str, float]:
    out = {f"recall@{k}": len(set(ranked[:k]) & relevant.keys()) / len(relevant) for k in (1, 5, 10)}
    out["mrr@10"] = next((1.0 / r for r, d in enumerate(ranked[:10], 1) if d in relevant), 0.0)
    dcg = sum(relevant.get(d, 0) / math.log2(r + 1) for r, d in enumerate(ranked[:10], 1))
    ideal = sum(g / math.log2(r + 1) for r, g in enumerate(sorted(relevant.values(), reverse=True)[:10], 1))
    out["ndcg@10"] = dcg / ideal if ideal else 0.0
    return out


def evaluate_beir(folder: Path, split: str = "test", encoder=None, modes: tuple[str, ...] = ("bm25", "dense", "hybrid"),
                  max_queries: int | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Index the corpus into a temporary collection and score each search mode."""
    corpus, queries, qrels = load_beir(folder, split)
    qids = sorted(qrels)[:max_queries] if max_queries else sorted(qrels)
    if encoder is None:
        modes = tuple(m for m in modes if m == "bm25")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        col = Collection(Path(tmp) / "beir", create=True, encoder=encoder)
        col.add_documents(corpus.items(), target=ONE_CHUNK, overlap=0)
        build = time.perf_counter() - t
        log(f"indexed {len(corpus):,} documents in {build:.1f} s")
        results: dict[str, dict[str, float]] = {}
        for mode in modes:
            sums: dict[str, float] = {}
            t = time.perf_counter()
            for q in qids:
                ranked = [h.source for h in col.search(queries[q], 10, mode)]
                for name, v in metrics(ranked, qrels[q]).items():
                    sums[name] = sums.get(name, 0.0) + v
            results[mode] = {name: v / len(qids) for name, v in sums.items()}
            results[mode]["ms_per_query"] = 1000 * (time.perf_counter() - t) / len(qids)
        col.close()
    results["_"] = {"documents": len(corpus), "queries": len(qids), "index_seconds": build}
    return results
