"""all-MiniLM-L6-v2 from the store (`make test` pulls it; skipped when absent): embeddings
against sentence-transformers on the same weights (or transformers + mean pooling when
sentence-transformers is not installed)."""

import numpy as np
import pytest
import torch

from lmforge import store
from lmforge.encoders import Encoder

pytestmark = pytest.mark.pretrained
MODEL = store.find("minilm-l6")
if MODEL is None:
    pytest.skip("minilm-l6 is not pulled (run: lmforge pull minilm-l6)", allow_module_level=True)


def sentences(n: int = 300) -> list[str]:
    import pydoc_data.topics as topics

    english = [s.strip() for t in topics.topics.values() for s in t.split(".") if 10 < len(s.strip()) < 300]
    other = ["人工智能正在改变世界。", "Das ist ein Satz auf Deutsch.", "🙂🚀 emoji only", "x", "",
             "def f(x):\n    return x ** 2", "naïve café — résumé"]
    return other + english[: n - len(other)]


def reference(texts):
    try:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(MODEL.path), device="cpu").encode(texts, batch_size=32)
    except ImportError:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(MODEL.path)
        model = transformers.AutoModel.from_pretrained(MODEL.path).eval()
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_parity_with_sentence_transformers():
    texts = sentences()
    ref = reference(texts)
    ours = Encoder.load("minilm-l6").embed(texts)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"MiniLM float vs reference: min cosine {cos.min():.7f} over {len(texts)} sentences")
    assert cos.min() >= 0.9999
    fast = Encoder.load("minilm-l6", quantize="int8").embed(texts)
    cos8 = (fast * ref).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"MiniLM int8 vs reference: min cosine {cos8.min():.5f}")
    assert cos8.min() >= 0.99


def test_semantic_neighbours():
    enc = Encoder.load("minilm-l6")
    sims = enc.similarity(["A man is playing a guitar."],
                          ["Someone plays an instrument.", "The stock market fell sharply today."])
    assert sims[0, 0] > sims[0, 1] + 0.3
