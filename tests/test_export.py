"""Export to the Hugging Face layout, checked against transformers itself (a test-only dependency)."""

import os

import pytest
import torch

from lmforge import api
from lmforge.api import LM
from lmforge.engine import SamplingParams
from lmforge.errors import LMForgeError

from conftest import TINY_TRAIN

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hf_greedy(hf_model, ids, n):
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                            pad_token_id=0)
    return out[0, len(ids):].tolist()


def _check(lm: LM, out_dir, text: str):
    lm.export(out_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    ids = lm.encode_prompt(text)
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids]))[0]
        theirs = hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    greedy = list(lm.engine.generate(ids, 12, SamplingParams(temperature=0)))
    assert _hf_greedy(hf, ids, 12) == greedy
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert tok(text, add_special_tokens=False)["input_ids"] == lm.tokenizer.encode(text, check=False)


def test_llama_style_gguf_model_round_trips_through_transformers(tmp_path):
    from test_gguf import bpe_tokenizer, llama_config, write_gguf
    from lmforge.models import build_model

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = build_model(llama_config(tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    lm = LM.load(write_gguf(tmp_path / "m.gguf", model, tok), quantize="none")
    _check(lm, tmp_path / "hf", "def add(a, b): return a + b")


def test_trained_gpt_checkpoint_exports_as_gpt2(tmp_path, corpus_file):
    api.train(tmp_path / "run", model="gpt", tokenizer="bpe", vocab_size=300, data=[str(corpus_file)],
              preset="tiny", show_progress=False, log=lambda *_: None, train_overrides=dict(TINY_TRAIN, steps=20))
    _check(LM.load(tmp_path / "run"), tmp_path / "hf", "The with statement")


def test_recurrent_models_do_not_export(tmp_path, corpus_file):
    api.train(tmp_path / "run", model="gru", data=[str(corpus_file)], preset="tiny", show_progress=False,
              log=lambda *_: None, train_overrides=dict(TINY_TRAIN, steps=2))
    with pytest.raises(LMForgeError, match="only Transformer models"):
        LM.load(tmp_path / "run").export(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
