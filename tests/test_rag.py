"""Retrieval collections: structure-aware chunking, SQLite/FTS5 storage with change detection,
BM25 search, and clean errors."""

from __future__ import annotations

import importlib.util
import sqlite3

import pytest

from lmforge.errors import LMForgeError
from lmforge.rag.chunking import chunk_text, html_to_text, read_document
from lmforge.rag.collection import Collection, fts_query


def test_chunks_follow_structure_cover_the_text_and_overlap():
    text = ("# Intro\n\nShort opening paragraph.\n\n## Details\n\n" + "A sentence about details. " * 60 +
            "\n\nClosing words.")
    chunks = chunk_text(text, target=300, overlap=60)
    assert all(text[c.start:c.end] == c.text for c in chunks)  # spans are exact
    assert all(len(c.text) <= 300 for c in chunks)
    assert chunks[0].heading == "Intro" and chunks[0].text.startswith("# Intro")
    assert not any("Details" in c.text and "opening" in c.text for c in chunks)  # never across a heading
    details = [c for c in chunks if c.heading == "Details"]
    assert len(details) >= 5
    for a, b in zip(details, details[1:]):
        assert 0 < a.end - b.start <= 60  # consecutive chunks share whole sentences
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing dropped
    with pytest.raises(LMForgeError, match="overlap"):
        chunk_text(text, target=100, overlap=100)


def test_html_and_binary_files(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><head><style>x{}</style><script>var a;</script></head><body><h1>Title</h1>"
                    "<p>First &amp; second.</p><p>Third</p></body></html>", encoding="utf-8")
    text = read_document(page)
    assert "var a" not in text and "x{}" not in text
    assert text.startswith("# Title") and "First & second." in text and "\n\nThird" in text
    assert html_to_text("<p>a</p><p>b</p>") == "a\n\nb"
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(LMForgeError, match="binary"):
        read_document(tmp_path / "b.bin")
    (tmp_path / "l.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LMForgeError, match="not UTF-8"):
        read_document(tmp_path / "l.txt")


def test_collection_ingest_change_detection_remove_and_bm25(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# Cats\n\nCats purr and chase mice around the barn.", encoding="utf-8")
    (docs / "sub" / "b.txt").write_text("Compilers translate source code into machine code.", encoding="utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG\x00\x00")  # skipped in folders
    (docs / ".hidden.txt").write_text("secret", encoding="utf-8")
    with Collection.open("t", create=True, root=tmp_path / "c") as col:
        r = col.add_paths([docs])
        assert (r.added, r.unchanged, r.chunks) == (2, 0, 2)
        assert [s.rsplit("/", 1)[-1] for s, _, _ in col.documents()] == ["a.md", "b.txt"]
        import hashlib

        for text, sha, start, end in col.db.execute('SELECT text, sha256, start, "end" FROM chunks'):
            assert sha == hashlib.sha256(text.encode()).hexdigest() and end - start == len(text)
        hits = col.search_bm25("what do compilers translate?")
        assert hits[0].source.endswith("b.txt") and hits[0].score > 0
        assert col.search_bm25("purring cats")[0].source.endswith("a.md")  # stemmed: purring ~ purr
        assert col.search_bm25("CÄTS")[0].source.endswith("a.md")  # case and diacritics folded
        assert col.search_bm25('"); DROP TABLE chunks; --') == []  # syntax is just text
        assert col.add_paths([docs]).unchanged == 2
        assert col.add_paths([docs, docs / "a.md"]).unchanged == 2 and len(col.documents()) == 2  # read once
        assert col.add_documents([("x", "one text"), ("x", "one text")]) == ["added", "unchanged"]
        assert col.remove(["x"]) == 1
        (docs / "a.md").write_text("# Dogs\n\nDogs bark at the postman.", encoding="utf-8")
        r = col.add_paths([docs])
        assert (r.updated, r.unchanged) == (1, 1)
        assert col.search_bm25("cats mice") == [] and col.search_bm25("postman")[0].heading == "Dogs"
        assert col.remove([str(docs / "sub")]) == 1  # a folder removes what lies under it
        assert len(col.documents()) == 1 and col.count_chunks() == 1
    with Collection.open("t", root=tmp_path / "c") as col:  # persisted
        assert col.search_bm25("bark")[0].source.endswith("a.md")


def test_pydoc_collection_and_bad_collections(tmp_path):
    with Collection.open("pydoc", create=True, root=tmp_path) as col:
        r = col.add_pydoc()
        assert r.added > 50 and r.chunks > r.added
        assert col.search_bm25("file objects read write")[0].source.startswith("pydoc:")
    with pytest.raises(LMForgeError, match="no collection"):
        Collection.open("missing", root=tmp_path)
    with pytest.raises(LMForgeError, match="bad collection name"):
        Collection.open("../escape", root=tmp_path, create=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "collection.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LMForgeError, match="not a usable collection"):
        Collection.open("broken", root=tmp_path)
    assert fts_query("C++ and/or \"quotes\"") == '"c" OR "and" OR "or" OR "quotes"'


def test_a_failed_ingest_keeps_the_previous_version(tmp_path, monkeypatch):
    """Each document is one transaction: if writing its new chunks fails, its old ones stay."""
    f = tmp_path / "d.txt"
    f.write_text("alpha beta gamma", encoding="utf-8")
    col = Collection.open("t", create=True, root=tmp_path / "c")
    col.add_paths([f])
    f.write_text("delta epsilon", encoding="utf-8")
    import lmforge.rag.collection as mod

    def broken(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")

    real = col.db
    class Failing:  # fails at the chunk insert, after the old rows were deleted in the transaction
        def __getattr__(self, name):
            return getattr(real, name)

        def executemany(self, *a, **k):
            broken()

        def __enter__(self):
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    monkeypatch.setattr(col, "db", Failing())
    with pytest.raises(sqlite3.OperationalError):
        col.add_paths([f])
    monkeypatch.setattr(col, "db", real)
    assert col.search_bm25("gamma") and not col.search_bm25("epsilon")
    assert mod.Collection.open("t", root=tmp_path / "c").count_chunks() == 1


def test_index_and_search_commands(tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    code, out, err = run_cli(["index", "list"], capsys)
    assert code == 0 and "no collections" in out
    code, out, err = run_cli(["index", "add"], capsys)  # no paths: Python's own documentation
    assert code == 0 and "added" in out
    code, out, err = run_cli(["search", "file objects", "-k", "2"], capsys)
    assert code == 0 and out.startswith("[1] ") and "pydoc:" in out and "[3]" not in out
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "n.md").write_text("# Kettles\n\nA kettle boils water.", encoding="utf-8")
    code, out, err = run_cli(["index", "add", notes, "--collection", "notes"], capsys)
    assert code == 0 and "1 added" in out
    code, out, err = run_cli(["search", "boiling water", "--collection", "notes"], capsys)
    assert "n.md > Kettles" in out
    code, out, err = run_cli(["index", "list"], capsys)
    assert "notes\t1 documents" in out and "pydoc\t" in out
    code, out, err = run_cli(["index", "remove", notes / "n.md", "--collection", "notes"], capsys)
    assert code == 0 and "1 document(s) removed" in out
    for args, msg in ((["search", "x", "--collection", "nope"], "no collection 'nope'"),
                      (["index", "add", tmp_path / "missing"], "no such file"),
                      (["index", "remove", "pydoc:none"], "nothing in 'pydoc' matches"),
                      (["index", "add", "--collection", "a/b"], "bad collection name"),
                      (["ask", "x", "--mode", "fuzzy"], "unknown --mode")):
        code, out, err = run_cli(args, capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (args, err)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from conftest import make_tiny_bert

    from lmforge.encoders import Encoder

    return Encoder.load(make_tiny_bert(tmp_path_factory.mktemp("bert")), device="cpu")


def test_dense_and_hybrid_search(tmp_path, tiny_encoder):
    """Vectors are stored with their chunks; a query equal to a chunk's text finds it by dense
    search (the tiny encoder is random, so only exact matches are certain); hybrid fuses ranks."""
    import numpy as np

    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {f"d{i}.txt": f"Topic {w}: the {w} is described here in plain words." for i, w in
             enumerate(["river", "mountain", "compiler", "violin", "glacier", "harbour"])}
    for name, t in texts.items():
        (docs / name).write_text(t, encoding="utf-8")
    col = Collection.open("v", create=True, root=tmp_path / "c", encoder=tiny_encoder)
    col.add_paths([docs])
    ids, mat = col._vectors()
    assert mat.shape == (6, 32) and np.allclose(np.linalg.norm(mat, axis=1), 1, atol=1e-5)
    for name, t in texts.items():
        dense = col.search_dense(t, 3)
        assert dense[0].source.endswith(name) and dense[0].score == pytest.approx(1.0, abs=1e-4)
        hybrid = col.search_hybrid(t, 3)
        assert hybrid[0].source.endswith(name)  # first in both rankings
    # rank fusion by hand for one query
    q = "the violin"
    bm, de = col.search_bm25(q, 100), col.search_dense(q, 100)
    fused = {}
    for hits in (bm, de):
        for r, h in enumerate(hits, 1):
            fused[h.chunk_id] = fused.get(h.chunk_id, 0) + 1 / (60 + r)
    assert [h.chunk_id for h in col.search_hybrid(q, 4)] == sorted(fused, key=lambda i: -fused[i])[:4]
    # a changed file gets new vectors in the same transaction; the cache notices
    (docs / "d3.txt").write_text("Entirely new text about kettles.", encoding="utf-8")
    col.add_paths([docs])
    assert col.search_dense("Entirely new text about kettles.", 1)[0].source.endswith("d3.txt")
    assert col.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == col.count_chunks() == 6
    col.close()
    other = type("Other", (), {"spec": "some-other-model", "embed": None})()
    with pytest.raises(LMForgeError, match="was embedded with"):
        Collection.open("v", root=tmp_path / "c", encoder=other)
    plain = Collection.open("v", root=tmp_path / "c")  # no encoder: hybrid falls back to BM25
    assert plain.search("kettles", 1, mode="hybrid")[0].source.endswith("d3.txt")
    with pytest.raises(LMForgeError, match="needs an embedding model"):
        plain.search("kettles", mode="dense")
    with pytest.raises(LMForgeError, match="unknown search mode"):
        plain.search("kettles", mode="fuzzy")


def test_an_encoder_given_later_embeds_what_is_there(tmp_path, tiny_encoder):
    col = Collection.open("late", create=True, root=tmp_path)
    col.add_text("a", "First document about rivers.")
    col.add_text("b", "Second document about mountains.")
    col.close()
    col = Collection.open("late", root=tmp_path, encoder=tiny_encoder)
    assert col.embed_model == tiny_encoder.spec
    assert col.search_dense("Second document about mountains.", 1)[0].source == "b"


def test_retrieval_metrics_and_a_tiny_beir_folder(tmp_path, tiny_encoder):
    import gzip
    import json
    import math

    from lmforge.rag.evaluate import evaluate_beir, load_beir, metrics

    m = metrics(["x", "a", "y", "b"], {"a": 1, "b": 2})
    assert m["recall@1"] == 0 and m["recall@5"] == 1 and m["mrr@10"] == 0.5
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 2 / math.log2(5)) / ideal)

    words = ["river", "mountain", "compiler", "violin", "glacier", "harbour", "desert", "orchard"]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, w in enumerate(words):
            f.write(json.dumps({"_id": f"d{i}", "title": w.title(), "text": f"All about the {w} and its ways."}) + "\n")
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"tell me about the {w}"}) + "\n"
                                                    for i, w in enumerate(words)), encoding="utf-8")
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(words))), encoding="utf-8")
    corpus, queries, qrels = load_beir(tmp_path)
    assert len(corpus) == 8 and corpus["d0"].startswith("River\n\n") and qrels["q3"] == {"d3": 1}
    r = evaluate_beir(tmp_path, encoder=tiny_encoder, log=lambda m: None)
    assert r["bm25"]["recall@1"] == 1.0 and r["bm25"]["ndcg@10"] == 1.0  # each query names its document
    assert set(r) == {"bm25", "dense", "hybrid", "_"} and 0 <= r["dense"]["ndcg@10"] <= 1
    assert r["hybrid"]["recall@10"] == 1.0
    if importlib.util.find_spec("usearch") is not None:  # the large-collection paths, forced, score the same
        big = evaluate_beir(tmp_path, encoder=tiny_encoder, log=lambda m: None, large_paths=True)
        assert big["bm25 (index)"]["ndcg@10"] == pytest.approx(big["bm25"]["ndcg@10"])
        assert big["dense (HNSW)"]["recall@10"] == pytest.approx(big["dense"]["recall@10"])
    with pytest.raises(LMForgeError, match="not a BEIR folder"):
        load_beir(tmp_path, split="dev")


def test_citations_are_checked_and_attributed():
    from lmforge.rag.ask import attribute, check_citations
    from lmforge.rag.collection import Hit

    sources = [Hit(1, 0.0, "a", "", "Kettles boil water quickly on a gas stove.", 0, 10),
               Hit(2, 0.0, "b", "", "Violins have four strings tuned in fifths.", 0, 10)]
    text, valid, removed = check_citations("Violins have four strings [2] [7].", 2)
    assert text == "Violins have four strings [2]." and valid == [2] and removed == [7]
    assert attribute("A violin has four strings, tuned in fifths.", sources) == 2
    assert attribute("Kettles boil water.", sources) == 1
    assert attribute("Nothing in common whatsoever here.", sources) is None


def test_ask_keeps_only_supported_citations_and_stops_at_repeats_and_blank_lines(tmp_path, tiny_encoder):
    """A scripted chat model cites the wrong source, repeats itself in other words, and starts a
    second paragraph: the citation moves to the source that backs the sentence, the repeat ends
    the answer, and generation stops at the blank line."""
    from lmforge.rag.ask import ask

    class ScriptedChat:
        context_limit = None

        class tokenizer:
            chat_template = "(any)"

            @staticmethod
            def encode(text, check=True):
                return list(text.encode("utf-8"))

            @staticmethod
            def render_chat(messages, add_generation_prompt=True):
                return "\n".join(m["content"] for m in messages)

        def chat(self, messages, max_new_tokens, temperature=0, stop=()):
            self.stop = stop
            prompt = messages[-1]["content"]
            kettle = 1 if "[1] (kettles" in prompt else 2  # the number the kettle source was given
            reply = (f"Violins have four strings tuned in fifths [{kettle}]. Kettles boil water quickly on a gas "
                     f"stove. A violin has four strings that are tuned in fifths, you see. Then more.")
            return (reply[i:i + 5] for i in range(0, len(reply), 5))

    col = Collection.open("c", create=True, root=tmp_path, encoder=tiny_encoder)
    col.add_text("kettles", "Kettles boil water quickly on a gas stove.")
    col.add_text("violins", "Violins have four strings tuned in fifths.")
    lm = ScriptedChat()
    a = ask("Tell me about violins and kettles", col, lm, k=2, min_similarity=-1.0)
    by_source = {h.source: n for n, h in enumerate(a.sources, 1)}
    assert len(by_source) == 2
    assert f"in fifths. [{by_source['violins']}]" in a.text  # moved from the kettle source that was cited
    assert a.unsupported == [by_source["kettles"]] and not a.removed
    assert f"gas stove. [{by_source['kettles']}]" in a.text  # attributed: the model cited nothing here
    assert a.text.count("[") == 2
    assert "you see" not in a.text and "Then more" not in a.text  # the repeat ended the answer
    assert "\n\n" in lm.stop  # a chat answer is complete at its first blank line


def test_ask_says_so_when_the_collection_has_nothing(tmp_path, tiny_encoder):
    from lmforge.rag.ask import NOT_FOUND, ask

    col = Collection.open("q", create=True, root=tmp_path, encoder=tiny_encoder)
    with pytest.raises(LMForgeError, match="is empty"):
        ask("anything?", col, lm=None)
    col.add_text("a", "Kettles boil water quickly on a gas stove.")
    said = []
    a = ask("anything?", col, lm=None, min_similarity=1.01, on_text=said.append)  # nothing can be that similar
    assert not a.found and a.text == NOT_FOUND and said == [NOT_FOUND] and not a.cited
    with pytest.raises(LMForgeError, match="empty"):
        ask("   ", col, lm=None)


def test_eval_retrieval_command(tmp_path, capsys):
    import json

    from test_cli import run_cli

    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": w, "text": f"about {w}"}) + "\n"
                                                   for i, w in enumerate(["kettles", "violins", "glaciers"])))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "violins please"}) + "\n")
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    code, out, err = run_cli(["eval", "retrieval", "--beir", tmp_path, "--embed", "none"], capsys)
    assert code == 0 and "bm25" in out and "1.0000" in out, (out, err)
    code, out, err = run_cli(["eval", "retrieval", "--beir", tmp_path / "nope", "--embed", "none"], capsys)
    assert code == 1 and "not a BEIR folder" in err


def _pydoc_queries(n: int) -> list[str]:
    import random
    import re

    from pydoc_data.topics import topics

    sentences = [s for t in topics.values() for s in re.split(r"(?<=[.?!])\s+", t) if 20 < len(s) < 200]
    return random.Random(0).sample(sentences, n) + ["What does the with statement do?", "naïve café_x 中文"]


def test_in_memory_bm25_index_gives_fts5_scores(tmp_path):
    """Large collections score BM25 from an in-memory index built out of FTS5's own token index;
    it must rank and score exactly as FTS5's bm25() does, persist, and notice changes."""
    col = Collection.open("p", create=True, root=tmp_path)
    col.add_pydoc()
    queries = _pydoc_queries(150)
    reference = {q: col._bm25(q, 20) for q in queries}  # a small collection: FTS5 bm25() itself
    assert not (tmp_path / "p" / "bm25.npz").exists()
    col.lexical_from = 0
    for q in queries:
        fast, ref = col._bm25(q, 20), reference[q]
        assert [i for i, _ in fast[:10]] == [i for i, _ in ref[:10]], q
        assert [s for _, s in fast] == pytest.approx([s for _, s in ref], rel=1e-5), q
    saved = tmp_path / "p" / "bm25.npz"
    assert saved.is_file()
    again = Collection.open("p", root=tmp_path)
    again.lexical_from = 0
    from lmforge.rag.lexical import LexicalIndex

    real_build = LexicalIndex.build
    LexicalIndex.build = classmethod(lambda *a, **k: pytest.fail("rebuilt a fresh index"))
    try:
        assert again._lexical().stamp == col.stamp  # loaded from bm25.npz, not rebuilt
    finally:
        LexicalIndex.build = real_build
    again.add_text("extra", "Quokkas are small marsupials found on Rottnest Island.")
    assert again.search_bm25("quokka marsupials")[0].source == "extra"  # stale index rebuilt
    saved.write_bytes(b"garbage")
    third = Collection.open("p", root=tmp_path)
    third.lexical_from = 0
    assert third.search_bm25("quokka")[0].source == "extra"  # an unreadable file is rebuilt, not trusted


def test_chinese_text_is_searchable_by_bigrams(tmp_path):
    from lmforge.rag.lexical import fts_text

    assert fts_text("我爱北京 ok") == " 我爱 爱北 北京  ok"
    col = Collection.open("zh", create=True, root=tmp_path)
    col.add_text("a", "北京是中国的首都，有很多名胜古迹。")
    col.add_text("b", "上海是一个国际化的大城市，位于长江入海口。")
    col.add_text("c", "Rivers flow into the sea.")
    for lexical_from in (10**9, 0):
        col.lexical_from = lexical_from
        assert col.search_bm25("中国的首都是哪里？")[0].source == "a"
        assert col.search_bm25("长江")[0].source == "b"


class _BagOfWords:
    """A stand-in sentence encoder: hashed word counts, so texts sharing words are close."""
    spec = "bag-of-words-64"

    def embed(self, texts):
        import zlib

        import numpy as np

        out = np.zeros((len(texts), 64), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in t.lower().split():
                out[r, zlib.crc32(w.encode()) % 64] += 1
        return out + 1e-3


def test_large_collections_use_an_hnsw_index_close_to_exact(tmp_path):
    pytest.importorskip("usearch")
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    col = Collection.open("big", create=True, root=tmp_path, encoder=_BagOfWords())
    col.add_documents([(f"d{i}", " ".join(rng.choices(words, k=12))) for i in range(1500)], target=2000, overlap=0)
    queries = [" ".join(rng.choices(words, k=6)) for _ in range(40)]
    exact = {q: col._dense(q, 10) for q in queries}
    assert not col.uses_ann()
    col.ann_from = 0
    assert col.uses_ann()
    recall = [len({i for i, _ in col._dense(q, 10)} & {i for i, _ in exact[q]}) / 10 for q in queries]
    assert sum(recall) / len(recall) >= 0.9
    top = col._dense(queries[0], 10)
    assert top[0][1] == pytest.approx(exact[queries[0]][0][1], abs=5e-3)  # float16 cosines
    files = list((tmp_path / "big").glob("vectors-*.usearch"))
    assert len(files) == 1 and col.stamp in files[0].name
    col.add_text("new", "w1 w2 w3 w4 w5 w6 w7 w8")
    assert col.search_dense("w1 w2 w3 w4 w5 w6 w7 w8", 1)[0].source == "new"  # rebuilt for the change
    files = list((tmp_path / "big").glob("vectors-*.usearch"))
    assert len(files) == 1 and col.stamp in files[0].name  # the stale file is gone
    assert col.refresh() == []  # nothing stale


def test_pdf_files_are_read_through_the_extra(tmp_path):
    pytest.importorskip("pypdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"pdf.fonttype": 42}):  # TrueType: a real text layer
        fig = plt.figure()
        fig.text(0.1, 0.5, "Quokkas live on Rottnest Island.")
        fig.savefig(tmp_path / "q.pdf")
        plt.close(fig)
    assert "Quokkas live on Rottnest Island." in read_document(tmp_path / "q.pdf")
    col = Collection.open("pdf", create=True, root=tmp_path / "c")
    assert col.add_paths([tmp_path]).added == 1  # folders include PDFs when pypdf is there
    assert col.search_bm25("quokka island")[0].source.endswith("q.pdf")
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 not really" * 20)
    with pytest.raises(LMForgeError, match="not a readable PDF"):
        read_document(tmp_path / "bad.pdf")


def test_encoder_reranking_prefers_the_chunk_with_the_answering_sentence():
    from lmforge.rag.collection import Hit
    from lmforge.rag.rerank import rerank

    broad = Hit(1, 0.9, "broad", "", "w1 w2 w3 a b c. w1 w2 d e f. w3 w1 g h i.", 0, 0)
    exact = Hit(2, 0.8, "exact", "", "p q r s t u v x y z. w1 w2 w3 w4 w5 w6.", 0, 0)
    out = rerank("w1 w2 w3 w4 w5 w6", [broad, exact], "encoder", encoder=_BagOfWords())
    assert [h.source for h in out] == ["exact", "broad"] and out[0].score > out[1].score
    assert rerank("q", [broad], "none") == [broad]
    with pytest.raises(LMForgeError, match="unknown reranker"):
        rerank("q", [broad], "magic")
    with pytest.raises(LMForgeError, match="needs a language model"):
        rerank("q", [broad], "llm")


def test_hybrid_fusion_weights(tmp_path):
    col = Collection.open("w", create=True, root=tmp_path, encoder=_BagOfWords())
    for i, t in enumerate(["alpha beta gamma", "alpha delta", "gamma gamma epsilon", "zeta eta theta"]):
        col.add_text(f"d{i}", t)
    q = "alpha gamma"
    bm, de = col._bm25(q, 100), col._dense(q, 100)
    for w in (0.0, 0.5, 3.0):
        fused = {}
        for weight, ranked in ((1.0, bm), (w, de)):
            for r, (i, _) in enumerate(ranked, 1):
                fused[i] = fused.get(i, 0) + weight / (10 + r)
        want = sorted(fused, key=lambda i: -fused[i])[:3]
        assert [h.chunk_id for h in col.search(q, 3, "hybrid", rrf_k=10, dense_weight=w)] == want
    assert [h.chunk_id for h in col.search(q, 3, "hybrid", dense_weight=0.0)] == [i for i, _ in bm[:3]]


def _squad_file(path):
    import json

    data = {"version": "test", "data": [{"title": "t", "paragraphs": [
        {"context": "The Eiffel Tower was finished in 1889 in Paris.",
         "qas": [{"id": "1", "question": "When was the Eiffel Tower finished?", "answers": [{"text": "1889"}]}]},
        {"context": "长城位于中国北方，全长两万多公里。",
         "qas": [{"id": "2", "question": "长城位于哪里？", "answers": [{"text": "中国北方"}]}]},
        {"context": "Penguins are birds that cannot fly but swim well.",
         "qas": [{"id": "3", "question": "What can penguins not do?", "answers": [{"text": "fly"}]},
                 {"id": "4", "question": "Unanswerable?", "answers": [], "is_impossible": True}]}]}]}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_squad_scoring_and_retrieval_hit_rates(tmp_path):
    from lmforge.rag.evaluate import answer_tokens, contains_answer, evaluate_squad, exact_match, f1_score, load_squad

    assert answer_tokens("The Eiffel-Tower, 1889!") == ["eiffel", "tower", "1889"]
    assert answer_tokens("中国北方。") == ["中", "国", "北", "方"]
    assert exact_match("the 1889.", ["1889"]) == 1.0 and exact_match("in 1889", ["1889"]) == 0.0
    assert f1_score("in 1889 the tower", ["1889"]) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert f1_score("位于中国北方", ["中国北方"]) == pytest.approx(2 * (4 / 6) / (4 / 6 + 1))
    assert contains_answer("It was finished in 1889.", ["1889"]) == 1.0 and contains_answer("no", ["1889"]) == 0.0
    contexts, qas = load_squad(_squad_file(tmp_path / "s.json"))
    assert len(contexts) == 3 and len(qas) == 3  # the unanswerable one is left out
    r = evaluate_squad(tmp_path / "s.json", mode="bm25", k=1, log=lambda m: None)
    assert r["hit@1"] == 1.0 and r["questions"] == 3 and "exact_match" not in r
    (tmp_path / "bad.json").write_text('{"data": [{"nope": 1}]}', encoding="utf-8")
    with pytest.raises(LMForgeError, match="not a SQuAD-format"):
        load_squad(tmp_path / "bad.json")


def test_eval_qa_command_and_its_bad_input(tmp_path, capsys):
    from test_cli import run_cli

    f = _squad_file(tmp_path / "s.json")
    code, out, err = run_cli(["eval", "qa", "--squad", f, "--model", "none", "--embed", "none", "--mode", "bm25"], capsys)
    assert code == 0 and "hit@1" in out and "1.0000" in out, err
    for args, msg in ((["--squad", tmp_path / "missing.json"], "no such file"),
                      (["--squad", f, "--mode", "fuzzy"], "unknown --mode"),
                      (["--squad", f, "-k", "0"], "-k must be at least 1")):
        code, out, err = run_cli(["eval", "qa", "--model", "none", "--embed", "none", *args], capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (args, err)
    code, out, err = run_cli(["search", "x", "--collection", "none", "--rerank", "magic"], capsys)
    assert code == 1 and "unknown --rerank" in err


def test_sources_fill_the_context_budget_and_a_too_long_question_is_refused():
    from lmforge.rag.ask import build_messages
    from lmforge.rag.collection import Hit

    class ByteTokenizer:  # one token per UTF-8 byte, no chat template (a base model's plain prompt)
        chat_template = None

        def encode(self, text, check=True):
            return list(text.encode("utf-8"))

    lm = type("TinyLM", (), {"context_limit": 900, "tokenizer": ByteTokenizer()})()
    hits = [Hit(i, 1.0, f"s{i}", "", "word " * 60, 0, 300) for i in range(5)]
    msgs, used = build_messages(lm, "What is a word?", hits, max_new_tokens=100)
    assert 1 <= len(used) < 5 and used == hits[:len(used)]  # best first, as many as fit
    assert len(ByteTokenizer().encode("\n\n".join(m["content"] for m in msgs))) <= 900 - 100
    with pytest.raises(LMForgeError, match="question is too long"):
        build_messages(lm, "why " * 300, hits, max_new_tokens=100)


def test_collections_from_an_older_layout(tmp_path, monkeypatch, capsys):
    """The default collection, built from Python's docs alone, is rebuilt when lmforge's storage
    layout changes; any other collection gets a clear error (its files may be gone)."""
    from test_cli import run_cli

    from lmforge.rag.collection import collections_root

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    for name in ("pydoc", "notes"):
        with Collection.open(name, create=True) as col:
            col.add_text("pydoc:with" if name == "pydoc" else "n.txt", "The with statement wraps a block.")
            col.db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
            col.db.commit()
    code, out, err = run_cli(["search", "with statement", "--mode", "bm25", "-k", "1"], capsys)
    assert code == 0 and "older lmforge; rebuilding" in err and "[1] " in out and "pydoc:" in out
    with Collection.open("pydoc") as col:
        assert len(col.documents()) > 50  # all of Python's docs, not the one planted document
    code, out, err = run_cli(["search", "with", "--collection", "notes"], capsys)
    assert code == 1 and "has schema 1" in err and str(collections_root() / "notes") in err


def test_a_file_named_beside_its_folder_is_indexed_once(tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("Kettles boil water.", encoding="utf-8")
    code, out, err = run_cli(["index", "add", d, d / "a.txt", "--collection", "n", "--embed", "none"], capsys)
    assert code == 0 and "1 added" in out and "Traceback" not in err, err
