import numpy as np
import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.tokenizer import LMTokenizer
from lmforge.corpus import Corpus, collect_files, read_text_chunks
from lmforge.train.data import prepare_data

from conftest import pydoc_text


def test_folder_expansion_skips_hidden_and_binary(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x").write_text("hidden")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\0\0\0binary")
    assert [p.name for p in collect_files([tmp_path])] == ["a.txt", "b.md"]


def test_utf8_split_across_chunks(tmp_path, monkeypatch):
    import lmforge.corpus as corpus

    monkeypatch.setattr(corpus, "_CHUNK", 5)  # forces multi-byte characters across read boundaries
    p = tmp_path / "zh.txt"
    text = "床前明月光，疑是地上霜。\r\nok"
    p.write_text(text, encoding="utf-8", newline="")
    assert "".join(read_text_chunks(p)) == text.replace("\r\n", "\n")


def test_non_utf8_error_names_file_and_offset(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello \xff world")
    with pytest.raises(LMForgeError, match=r"bad.txt is not UTF-8 text \(invalid byte 0xff near byte 6\)"):
        list(read_text_chunks(p))


def test_token_file_split_and_batches(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(pydoc_text(20_000), encoding="utf-8")
    corpus = Corpus([f])
    tok = LMTokenizer.train_char(corpus.texts())
    data = prepare_data(tmp_path / "data", corpus, tok, 0.1, log=lambda *_: None)
    assert data.n_tokens == 20_000 and data.n_train == 18_000
    ids = np.asarray(tok.encode(f.read_text(encoding="utf-8")))
    assert np.array_equal(np.asarray(data.array("val")), ids[18_000:])  # the tail is validation
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.batch("train", 4, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(x, x2)  # same seed, same batch
    # unchanged sources and tokenizer: the token file is reused, not rewritten
    mtime = data.path.stat().st_mtime_ns
    again = prepare_data(tmp_path / "data", corpus, tok, 0.1, log=lambda *_: None)
    assert again.path.stat().st_mtime_ns == mtime


def test_default_corpus_is_python_docs():
    corpus = Corpus(None)
    first = next(iter(corpus.texts()))
    assert len(first) > 0 and "pydoc" in corpus.describe()
