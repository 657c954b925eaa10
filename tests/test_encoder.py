"""Sentence embeddings on a tiny BERT written here in the sentence-transformers layout:
transformers' own BertModel (mean pooling, L2 normalisation done by hand) is the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.encoders import Encoder
from lmforge.errors import LMForgeError

from conftest import make_tiny_bert
from test_cli import run_cli

transformers = pytest.importorskip("transformers")

TEXTS = ["hello world", "The with statement is used to wrap the execution of a block.", "", "你好，世界 🙂",
         "a " * 80, "def f(x): return x"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("minibert"))


def reference(folder, texts):
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tk.enable_truncation(48)
    model = transformers.BertModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding anywhere in the reference
            ids = torch.tensor([tk.encode(t).ids])
            h = model(input_ids=ids).last_hidden_state[0].mean(0)
            out.append(torch.nn.functional.normalize(h, dim=0).numpy())
    return np.stack(out)


def test_embeddings_match_transformers(folder):
    enc = Encoder.load(folder)
    assert enc.settings.max_len == 48 and enc.settings.normalize and enc.dim == 32
    ours = enc.embed(TEXTS, batch_size=4)  # padded, length-sorted batches
    np.testing.assert_allclose(ours, reference(folder, TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # the order of texts and the batch size change nothing
    again = enc.embed(TEXTS[::-1], batch_size=1)[::-1]
    np.testing.assert_allclose(again, ours, atol=1e-5)


def test_int8_embeddings_stay_close(folder):
    exact, fast = Encoder.load(folder).embed(TEXTS * 4), Encoder.load(folder, quantize="int8").embed(TEXTS * 4)
    cos = (exact * fast).sum(1)
    assert cos.min() > 0.98, cos.min()
    sims = Encoder.load(folder).similarity(["hello world"], ["hello world", "def f(x): return x"])
    assert sims.shape == (1, 2) and sims[0, 0] == pytest.approx(1.0, abs=1e-5) and sims[0, 1] < sims[0, 0]


def test_cli_embed_writes_npy(folder, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS[:4]) + "\n", encoding="utf-8")
    code, out, err = run_cli(["embed", str(folder), "--in", str(src), "--out", str(tmp_path / "e.npy")], capsys)
    assert code == 0, err
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (4, 32) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, reference(folder, TEXTS[:4]), atol=1e-5)


def test_bad_inputs(folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for args, msg in ((["--in", str(tmp_path / "missing.txt")], "no such file"),
                      (["--in", str(empty)], "no lines"),
                      (["--in", str(latin)], "not UTF-8")):
        code, out, err = run_cli(["embed", str(folder), *args, "--out", str(tmp_path / "x.npy")], capsys)
        assert code == 1 and msg in err and "Traceback" not in err
        assert not (tmp_path / "x.npy").exists()
    with pytest.raises(LMForgeError, match="sentence encoder, not a language model"):
        from lmforge.api import LM

        LM.load(folder)
    with pytest.raises(LMForgeError, match="not an encoder folder"):
        Encoder.load(tmp_path)
    with pytest.raises(LMForgeError, match="quantize"):
        Encoder.load(folder, quantize="int3")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(LMForgeError, match="corrupt"):
        Encoder.load(broken)
