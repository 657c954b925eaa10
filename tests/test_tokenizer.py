import numpy as np
import pytest

from lmforge.errors import LMForgeError
from lmforge.tokenizer import LMTokenizer, StreamDecoder

from conftest import MIXED, pydoc_text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_including_chinese(kind, tmp_path):
    poem = "床前明月光，疑是地上霜。"
    tok = LMTokenizer.train(kind, [pydoc_text(20_000), MIXED, poem], vocab_size=400)
    for text in (MIXED, "床前明月光，疑是地上霜。", "def f(x):\n    return x ** 2\n", " leading and trailing "):
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tokenizer.json")
    again = LMTokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == kind
    assert again.encode(MIXED) == tok.encode(MIXED)


def test_bpe_handles_text_never_seen():
    tok = LMTokenizer.train_bpe([pydoc_text(20_000)], vocab_size=300)
    unseen = "Ελληνικά 日本語のテキスト 🦀"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.vocab_size <= 300 and tok.eot_id is not None


def test_bpe_merges_reduce_token_count():
    text = pydoc_text(30_000)
    tok = LMTokenizer.train_bpe([text], vocab_size=1000)
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_char_tokenizer_rejects_unknown_characters():
    tok = LMTokenizer.train_char(["abc def"])
    assert tok.vocab_size == 1 + len(set("abc def"))
    with pytest.raises(LMForgeError, match="never saw: '世'"):
        tok.encode("abc 世")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_bytes_sum_to_utf8_length(kind):
    tok = LMTokenizer.train(kind, [pydoc_text(10_000), MIXED], vocab_size=350)
    ids = tok.encode(MIXED)
    assert int(tok.token_bytes[np.asarray(ids)].sum()) == len(MIXED.encode("utf-8"))


def test_stream_decoder_never_splits_a_character():
    tok = LMTokenizer.train_bpe(["plain ascii only"], vocab_size=260)
    text = "你好🙂"
    ids = tok.encode(text)  # multi-byte characters: several byte tokens each
    assert len(ids) > len(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_empty_text_is_an_error():
    with pytest.raises(LMForgeError):
        LMTokenizer.train_char([""])


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(LMForgeError, match="not a valid tokenizer.json"):
        LMTokenizer.load(bad)
