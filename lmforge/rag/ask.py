"""Grounded answers: retrieve, prompt with numbered sources, generate, and check the citations.

Citations come from two places. Numbers the model writes itself ("[2]") are kept when they name
a source it was shown, and removed and reported otherwise. A sentence of the answer that cites
nothing gets the source whose words it shares most, when it shares enough. Small models such as
SmolLM2-135M rarely cite on their own but do copy from their sources, so this attribution is
what makes their citations dependable. When the best source is not similar enough to the
question, no answer is generated: the reply says the collection has nothing on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from lmforge.errors import LMForgeError
from lmforge.rag.collection import Collection, Hit
from lmforge.rag.lexical import query_words

SYSTEM = ("You answer questions using only the numbered sources given. After each fact, cite its source number "
          "in brackets, like [1]. If the sources do not contain the answer, say you do not know.")
INSTRUCTION = "Answer in two or three sentences and cite the sources like [1]."
SHORT = "Answer with a short phrase from the sources and cite it like [1]."  # extractive QA (eval qa)
NOT_FOUND = "The collection has nothing on this question, so there is no grounded answer to give."
STOP = ("\nQuestion:", "\nSources:")  # the model starting a new exchange of its own
# A chat model's answer is complete at its first blank line: what SmolLM2 adds after one restates
# the first paragraph
CHAT_STOP = STOP + ("\n\n",)
SUPPORT = 0.35  # a cited source must hold at least this share of the sentence's content words
REPEAT = 0.6  # a sentence sharing this share of its content words with an earlier one repeats it
# function words carry no evidence that a source supports a sentence
_STOPWORDS = frozenset("""the and for are but not you your can has have had was were will would with this that these
those from into onto than then them they their there what when where which while who whom why how its it's also
such use used using may might must should could does did doing been being about after before over under more most
some any all each other only own same very just one two""".split())
_CITE = re.compile(r"\s*\[(\d+)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])|(?<=[。！？])|\n\s*\n")


@dataclass
class Answer:
    text: str
    sources: list[Hit]  # numbered from 1, as shown to the model
    cited: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)  # numbers the model cited that name no source
    unsupported: list[int] = field(default_factory=list)  # sources cited where their text does not back the sentence
    found: bool = True


def _words(text: str) -> set[str]:
    return {w for w in query_words(text) if len(w) > 2 or not w.isascii()}  # CJK comes as bigrams


def _content(text: str) -> set[str]:
    return _words(text) - _STOPWORDS


def support(sentence: str, source_text: str) -> float:
    """The share of the sentence's content words that the source's text holds (1.0 when the
    sentence has too few content words to judge)."""
    words = _content(sentence)
    return len(words & _content(source_text)) / len(words) if len(words) >= 3 else 1.0


def attribute(sentence: str, sources: list[Hit], min_overlap: float = 0.5) -> int | None:
    """The source (1-based) sharing the largest share of the sentence's content words, if at
    least min_overlap of them."""
    if len(_content(sentence)) < 3:
        return None
    shares = [support(sentence, h.text) for h in sources]
    best = max(range(len(shares)), key=shares.__getitem__, default=None)
    return best + 1 if best is not None and shares[best] >= min_overlap else None


def repeats(sentence: str, earlier: list[set[str]]) -> bool:
    """Whether the sentence says again what an earlier one said (most of its content words)."""
    words = _content(_CITE.sub("", sentence))
    return any(len(words & e) >= REPEAT * max(1, min(len(words), len(e))) for e in earlier) if words else False


def check_citations(sentence: str, n_sources: int) -> tuple[str, list[int], list[int]]:
    """(sentence without invalid citations, valid numbers, removed numbers)."""
    valid, removed = [], []

    def keep(m: re.Match) -> str:
        n = int(m.group(1))
        if 1 <= n <= n_sources:
            valid.append(n)
            return m.group(0)
        removed.append(n)
        return ""

    return _CITE.sub(keep, sentence), valid, removed


def build_messages(lm, question: str, hits: list[Hit], max_new_tokens: int, per_source_chars: int = 700,
                   instruction: str = INSTRUCTION) -> tuple[list[dict], list[Hit]]:
    """The chat messages with as many sources (best first) as the context leaves room for."""
    budget = (lm.context_limit or 1 << 30) - max_new_tokens - 8
    plain = not lm.tokenizer.chat_template
    used: list[Hit] = []
    for h in hits:
        trial = used + [h]
        if _n_tokens(lm, _messages(question, trial, per_source_chars, instruction, plain)) > budget:
            break
        used = trial
    msgs = _messages(question, used, per_source_chars, instruction, plain)
    if _n_tokens(lm, msgs) > budget:
        raise LMForgeError("the question is too long for the model's context; shorten it")
    return msgs, used


def render(lm, messages: list[dict]) -> str:
    """The prompt text: the model's chat template, or for a base model (no template) the same
    content as a plain document that ends where the answer starts."""
    if lm.tokenizer.chat_template:
        return lm.tokenizer.render_chat(messages, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\nAnswer:"


def _n_tokens(lm, messages: list[dict]) -> int:
    return len(lm.tokenizer.encode(render(lm, messages), check=False))


def _messages(question: str, hits: list[Hit], per_source_chars: int, instruction: str = INSTRUCTION,
              plain: bool = False) -> list[dict]:
    """System and user messages. plain (a base model): the instruction goes before the question,
    so that the document ends "Question: ...\nAnswer:" and the model continues with the answer."""
    blocks = []
    for i, h in enumerate(hits, 1):
        where = h.source + (f" > {h.heading}" if h.heading else "")
        blocks.append(f"[{i}] ({where})\n{' '.join(h.text.split())[:per_source_chars]}")
    sources = "\n\n".join(blocks)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\n{instruction}\n\nQuestion: {question}" if plain
             else f"Sources:\n\n{sources}\n\nQuestion: {question}\n{instruction}"}]


def ask(question: str, collection: Collection, lm, k: int = 3, mode: str = "hybrid", max_new_tokens: int = 200,
        min_similarity: float = 0.3, on_text: Callable[[str], None] | None = None,
        instruction: str = INSTRUCTION, rerank: str = "none", dense_weight: float = 1.0) -> Answer:
    """Answer from the collection. on_text receives the answer a sentence at a time, with its
    citations, as it is generated. Chat models get their chat template; base models a plain
    prompt ending in "Answer:", and their answer ends with its first line. rerank ("encoder" or
    "llm") reorders the top max(3k, 10) retrieved chunks before the best k are kept."""
    if not question.strip():
        raise LMForgeError("the question is empty")
    if max_new_tokens <= 0:
        raise LMForgeError("--max-tokens must be positive")
    if collection.count_chunks() == 0:
        raise LMForgeError(f"collection {collection.name!r} is empty; add documents with lmforge index add")
    ctx = getattr(lm, "context_limit", None)  # (None when only retrieval can answer: nothing found)
    if ctx is not None and max_new_tokens >= ctx // 2:
        raise LMForgeError(f"--max-tokens {max_new_tokens:,} leaves no room for the question and its sources in "
                           f"the model's context of {ctx:,} tokens; use at most {ctx // 2 - 1:,}")
    from lmforge.rag.rerank import pool_size, rerank as rerank_hits

    hits = collection.search(question, pool_size(k, rerank), mode, dense_weight=dense_weight)
    hits = rerank_hits(question, hits, rerank, collection.encoder, lm)[:k]
    if collection.encoder is not None:
        best = collection.search_dense(question, 1)
        found = bool(best) and best[0].score >= min_similarity
    else:
        found = bool(hits)
    if not found or not hits:
        if on_text:
            on_text(NOT_FOUND)
        return Answer(NOT_FOUND, [], found=False)
    msgs, sources = build_messages(lm, question, hits, max_new_tokens, instruction=instruction)
    answer = Answer("", sources)
    pending = ""

    def flush(sentence: str, sep: str) -> None:
        text, valid, removed = check_citations(sentence, len(sources))
        answer.removed += removed
        # a number the model wrote stays only where that source's text backs the sentence
        plain = _CITE.sub("", text).rstrip()
        backed = [n for n in valid if support(plain, sources[n - 1].text) >= SUPPORT]
        answer.unsupported += [n for n in valid if n not in backed and n not in answer.unsupported]
        if backed != valid:
            text = plain + "".join(f" [{n}]" for n in dict.fromkeys(backed))
        if not backed:
            n = attribute(plain, sources)
            if n is not None:
                backed = [n]
                text = plain + f" [{n}]"
        answer.cited += [n for n in backed if n not in answer.cited]
        answer.text += text + sep
        if on_text:
            on_text(text + sep)

    said: list[set[str]] = []
    # no repetition penalty: at 1.05-1.1 SmolLM2's answers wandered into code; stopping at a
    # sentence that repeats an earlier one ends its loops instead
    if lm.tokenizer.chat_template:
        pieces = lm.chat(msgs, max_new_tokens, temperature=0, stop=CHAT_STOP)
    else:
        pieces = lm.stream(render(lm, msgs), max_new_tokens, temperature=0, stop=STOP + ("\n",))  # one line
    for piece in pieces:
        pending += piece
        while (m := _SENTENCE.search(pending)) is not None:
            sentence, sep, pending = pending[:m.start()], pending[m.start():m.end()], pending[m.end():]
            if repeats(sentence, said):  # a small model that starts repeating itself has said what it knows
                pending = ""
                pieces.close()
                break
            said.append(_content(_CITE.sub("", sentence)))
            flush(sentence, sep)
    if pending.strip() and not repeats(pending, said):
        flush(pending, "")
    answer.text = answer.text.strip()
    return answer
