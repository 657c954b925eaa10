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
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

from lmforge.errors import LMForgeError
from lmforge.rag.collection import ANN_FROM, LEXICAL_FROM, Collection

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


def _resolve_models(encoder, lm):
    if isinstance(encoder, str):
        from lmforge.encoders import Encoder

        encoder = None if encoder == "none" else Encoder.load(encoder)
    if isinstance(lm, str):
        from lmforge.api import LM

        lm = None if lm == "none" else LM.load(lm)
    return encoder, lm


def evaluate_beir(folder: Path, split: str = "test", encoder=None, modes: tuple[str, ...] = ("bm25", "dense", "hybrid"),
                  max_queries: int | None = None, log: Callable[[str], None] = print, rerank: str = "none",
                  lm=None, candidates: int = 20, large_paths: bool = False) -> dict[str, dict[str, float]]:
    """Index the corpus into a temporary collection and score each search mode; with a
    reranker, also "hybrid+RERANKER": the hybrid top `candidates` reordered. large_paths: also
    score each mode again on the paths large collections take (in-memory BM25, HNSW), whatever
    this collection's size, to show they lose nothing. encoder / lm: objects, or a model's
    name ("none": without)."""
    encoder, lm = _resolve_models(encoder, lm)
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
        from lmforge.rag.rerank import rerank as rerank_hits

        runs = [(m, False) for m in modes]
        if rerank != "none":
            runs.append((f"hybrid+{rerank}", False))
        if large_paths:
            runs += [(m, True) for m in modes]
        for mode, large in runs:
            sums: dict[str, float] = {}
            col.lexical_from, col.ann_from = (0, 0) if large else (LEXICAL_FROM, ANN_FROM)
            name = mode
            if large:
                from lmforge.rag import ann

                graph = "HNSW" if ann.available() else "exact, no usearch"
                name = {"bm25": "bm25 (index)", "dense": f"dense ({graph})", "hybrid": f"hybrid (index+{graph})"}[mode]
                col.refresh()  # built before the clock starts, as index add does
            t = time.perf_counter()
            for q in qids:
                if "+" in mode:
                    hits = rerank_hits(queries[q], col.search(queries[q], candidates, "hybrid"), rerank, encoder, lm)
                    ranked = [h.source for h in hits[:10]]
                else:
                    ranked = [h.source for h in col.search(queries[q], 10, mode)]
                for metric, v in metrics(ranked, qrels[q]).items():
                    sums[metric] = sums.get(metric, 0.0) + v
            results[name] = {metric: v / len(qids) for metric, v in sums.items()}
            results[name]["ms_per_query"] = 1000 * (time.perf_counter() - t) / len(qids)
        col.close()
    results["_"] = {"documents": len(corpus), "queries": len(qids), "index_seconds": build}
    return results


# ---------------------------------------------------------------------- question answering
def load_squad(path: Path) -> tuple[list[str], list[tuple[str, int, list[str]]]]:
    """(distinct contexts, [(question, its context's index, gold answers)]) from a SQuAD-format
    JSON file (SQuAD 1.1/2.0, CMRC 2018); unanswerable questions are left out."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        contexts: dict[str, int] = {}
        qas = []
        for article in data:
            for para in article["paragraphs"]:
                ctx = contexts.setdefault(para["context"], len(contexts))
                for qa in para["qas"]:
                    answers = [a["text"] for a in qa.get("answers", []) if a.get("text", "").strip()]
                    if answers and not qa.get("is_impossible", False):
                        qas.append((qa["question"], ctx, answers))
    except FileNotFoundError:
        raise LMForgeError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LMForgeError(f"{path} is not a SQuAD-format JSON file ({type(e).__name__}: {e})") from None
    if not qas:
        raise LMForgeError(f"{path} has no answerable questions")
    return list(contexts), qas


_ARTICLES = {"a", "an", "the"}


def answer_tokens(text: str) -> list[str]:
    """SQuAD-style normalization for scoring: lower case, punctuation and English articles
    dropped; CJK scored by character (as CMRC 2018 does), other text by word."""
    import unicodedata

    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text.lower())
    out: list[str] = []
    for word in text.split():
        if word in _ARTICLES:
            continue
        run = ""
        for c in word:
            if "\u3400" <= c <= "\u9fff" or "\u3040" <= c <= "\u30ff" or "\uac00" <= c <= "\ud7af":
                if run:
                    out.append(run)
                    run = ""
                out.append(c)
            else:
                run += c
        if run:
            out.append(run)
    return out


def exact_match(prediction: str, golds: list[str]) -> float:
    p = answer_tokens(prediction)
    return float(any(p == answer_tokens(g) for g in golds))


def f1_score(prediction: str, golds: list[str]) -> float:
    from collections import Counter

    p = answer_tokens(prediction)
    best = 0.0
    for g in map(answer_tokens, golds):
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            precision, recall = common / len(p), common / len(g)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(prediction: str, golds: list[str]) -> float:
    """The lenient score for generated answers: a gold answer appears inside the prediction."""
    p = " ".join(answer_tokens(prediction))
    return float(any((g := " ".join(answer_tokens(x))) and g in p for x in golds))


def evaluate_squad(path: Path, lm=None, encoder=None, k: int = 3, mode: str = "hybrid", max_answers: int | None = 50,
                   max_new_tokens: int = 48, log: Callable[[str], None] = print, dense_weight: float = 1.0,
                   on_answer: Callable[[str, str, list[str]], None] | None = None) -> dict[str, float]:
    """Index the contexts into a temporary collection (default chunking) and report retrieval
    hit rates (is the question's own context among the top 1 / k?) over every question, then
    exact match, F1 and contains-the-answer of `ask` over the first max_answers questions.
    lm / encoder: objects, or a model's name ("none": without)."""
    encoder, lm = _resolve_models(encoder, lm)
    from lmforge.rag.ask import SHORT, ask

    contexts, qas = load_squad(path)
    if encoder is None and mode != "bm25":
        mode = "bm25"
    out: dict[str, float] = {"contexts": len(contexts), "questions": len(qas), "mode": mode}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        col = Collection(Path(tmp) / "squad", create=True, encoder=encoder)
        col.add_documents((f"context{i}", c) for i, c in enumerate(contexts))
        out["index_seconds"] = time.perf_counter() - t
        log(f"indexed {len(contexts):,} contexts ({col.size():,} chunks) in {out['index_seconds']:.1f} s")
        top1 = topk = 0
        for question, ctx, _ in qas:
            sources = [h.source for h in col.search(question, k, mode, dense_weight=dense_weight)]
            top1 += bool(sources) and sources[0] == f"context{ctx}"
            topk += f"context{ctx}" in sources
        out["hit@1"], out[f"hit@{k}"] = top1 / len(qas), topk / len(qas)
        if lm is not None and max_answers != 0:
            chosen = qas[:max_answers] if max_answers else qas
            em = f1 = has = declined = 0.0
            t = time.perf_counter()
            for question, _, golds in chosen:
                a = ask(question, col, lm, k=k, mode=mode, max_new_tokens=max_new_tokens, instruction=SHORT,
                        dense_weight=dense_weight)
                text = re.sub(r"\s*\[\d+\]", "", a.text).strip() if a.found else ""  # a refusal scores 0
                declined += not a.found
                em += exact_match(text, golds)
                f1 += f1_score(text, golds)
                has += contains_answer(text, golds)
                if on_answer:
                    on_answer(question, text, golds)
            n = len(chosen)
            out.update({"answered": n, "exact_match": em / n, "f1": f1 / n, "contains": has / n,
                        "declined": declined / n, "seconds_per_answer": (time.perf_counter() - t) / n})
        col.close()
    return out
