"""Shared fixtures: small text corpora made on the spot (no ../shared needed), tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pydoc_text(n_chars: int = 60_000) -> str:
    """English text that ships with every Python: the first n_chars of its help topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:n_chars]


MIXED = "Hello, world! 你好，世界。 naïve café — emoji 🙂🚀 tabs\tand\nnewlines\r\n数学 ∑x² = 1"


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(pydoc_text(), encoding="utf-8")
    return p


TINY_TRAIN = dict(steps=12, batch_size=4, warmup_steps=2, eval_interval=6, eval_iters=2, log_interval=1)


def make_tiny_bert(d):
    """A random BertModel (hidden 32, 2 layers) and a WordPiece tokenizer trained on Python's docs,
    in the sentence-transformers folder layout (mean pooling, L2 normalisation, 48 tokens)."""
    import re
    from collections import Counter

    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    # a fixed vocabulary (not a trained one, whose ties the trainer may break differently from run
    # to run): special tokens, every letter alone and as a suffix piece, the 300 commonest words
    words = Counter(re.findall(r"[a-z]+", (pydoc_text(30_000) + " " + MIXED).lower()))
    chars = sorted(set("".join(words)) | set("0123456789.,:;!?()[]{}'\"-_=+*/<>#@%&|"))
    common = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:300] if len(w) > 1]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars] + common
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.save(str(d / "tokenizer.json"))
    wp = tk
    cfg = transformers.BertConfig(vocab_size=wp.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(d, safe_serialization=True)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (d / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                {"type": "sentence_transformers.models.Pooling"},
                                                {"type": "sentence_transformers.models.Normalize"}]))
    return d


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_chat_lm(stop: bool = True, seed: int = 0):
    """A random 2-layer LLaMA-style model with a byte-level BPE tokenizer (300 tokens, trained on
    Python's docs) and a ChatML template. stop=False: no end-of-turn token and a 4,096-token
    context, so replies run to their token limit for seconds (for tests that must catch a
    generation in flight)."""
    from tokenizers import AddedToken

    from lmforge.api import LM
    from lmforge.config import ModelConfig
    from lmforge.models import build_model
    from lmforge.tokenizer import LMTokenizer

    base = LMTokenizer.train_bpe([pydoc_text(20_000), MIXED], vocab_size=300)
    base.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok = LMTokenizer(base.tk, "bpe", eos_id=base.tk.token_to_id("<|im_end|>"), chat_template=CHATML)
    if not stop:
        tok.stop_ids = []
    cfg = ModelConfig(n_layer=2 if stop else 4, n_head=4, n_kv_head=2, n_embd=32 if stop else 128,
                      vocab_size=tok.vocab_size, block_size=512 if stop else 4096,
                      pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # weights large enough that greedy output is varied
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LM(model, tok)


class LiveServer:
    """lmforge's HTTP app served by uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, service, **app_kw):
        import socket
        import threading
        import time

        import uvicorn

        from lmforge.server.app import create_app

        self.service = service
        app = create_app(service, **app_kw)
        service.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 30:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()
