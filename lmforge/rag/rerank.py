"""Second-stage reranking of retrieved chunks, by the sentence encoder or by the language model.

encoder: a chunk's vector averages everything it says, so a chunk with one sentence that
    answers the question can rank below a chunk that is loosely about it throughout. The
    reranker embeds each candidate's sentences and scores the chunk by its best sentence
    (blended with the chunk's own cosine).
llm: the language model scores how likely the question is after each passage (one forward
    per candidate, batched): slower, and only as good as the model.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.rag.collection import Hit

RERANKERS = ("none", "encoder", "llm")
_SPLIT = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def pool_size(k: int, how: str) -> int:
    """How many chunks to retrieve so that a reranker has room to reorder the best k."""
    return k if how == "none" else max(3 * k, 10)


def rerank(query: str, hits: list[Hit], how: str, encoder=None, lm=None) -> list[Hit]:
    """The hits reordered (scores replaced by the reranker's), best first."""
    if how == "none" or not hits:
        return hits
    if how == "encoder":
        if encoder is None:
            raise LMForgeError("encoder reranking needs an embedding model (a collection with vectors)")
        scores = encoder_scores(query, [h.text for h in hits], encoder)
    elif how == "llm":
        if lm is None:
            raise LMForgeError("LLM reranking needs a language model")
        scores = llm_scores(query, [h.text for h in hits], lm)
    else:
        raise LMForgeError(f"unknown reranker {how!r}: use {', '.join(RERANKERS)}")
    order = sorted(range(len(hits)), key=lambda i: -scores[i])
    return [replace(hits[i], score=float(scores[i])) for i in order]


def encoder_scores(query: str, texts: list[str], encoder, max_sentences: int = 24) -> list[float]:
    """0.5 * cos(query, chunk) + 0.5 * max over the chunk's sentences of cos(query, sentence)."""
    pieces: list[str] = [query, *texts]
    owner: list[int] = [-1, *range(len(texts))]
    for i, t in enumerate(texts):
        sentences = [s for s in _SPLIT.split(t) if len(s.strip()) > 15][:max_sentences]
        pieces += sentences
        owner += [i] * len(sentences)
    v = np.asarray(encoder.embed(pieces), dtype=np.float32)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = v[1:] @ v[0]  # (pieces - 1,)
    chunk = sims[:len(texts)]
    best = chunk.copy()
    np.maximum.at(best, np.array(owner[1 + len(texts):], dtype=np.int64), sims[len(texts):])  # best sentence
    return list(0.5 * chunk + 0.5 * best)


def llm_scores(query: str, texts: list[str], lm, batch: int = 4, max_chars: int = 900) -> list[float]:
    """log P(query | passage) under the language model, the query written as a question the
    passage prompts (unsupervised query-likelihood reranking; Sachan et al., 2022). Asking a
    135M model "is this relevant? Yes/No" gave the same answer for every passage; how well a
    passage predicts the question's words separates them."""
    tok = lm.tokenizer
    question = tok.encode(" " + " ".join(query.split()), check=False)
    if not question:
        raise LMForgeError("the query has no tokens to score")
    cfg = lm.config
    limit = cfg.context_limit or cfg.context_window  # the scoring forward must fit either way
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []  # as the model was trained
    room = (limit or 1 << 30) - len(question) - len(bos)
    if room < 8:
        raise LMForgeError("the query is too long for the model's context to score passages with it")
    pairs = []
    for t in texts:
        prompt = (f"Passage: {' '.join(t.split())[:max_chars]}\n"
                  f"Please write a question based on this passage.\nQuestion:")
        pairs.append((bos + tok.encode(prompt, check=False)[-room:], question))
    return lm.engine.continuation_logprobs(pairs, batch)
