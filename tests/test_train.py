import json

import numpy as np
import pytest
import torch

from lmforge import api
from lmforge.errors import LMForgeError
from lmforge.weights.checkpoint import read_checkpoint

from conftest import TINY_TRAIN


def _train(out, corpus, family="gpt", tokenizer="char", stop_after=None, resume=False, **over):
    if resume:  # a resumed run keeps its own family, tokenizer and sizes
        family = tokenizer = None
    return api.train(out, model=family, tokenizer=tokenizer, data=[str(corpus)], preset=None if resume else "tiny",
                     vocab_size=None if resume else 300,
                     resume=resume, show_progress=False, log=lambda *_: None, stop_after=stop_after,
                     train_overrides={**TINY_TRAIN, **over})


@pytest.mark.parametrize("family,tokenizer", [("gpt", "char"), ("lstm", "bpe")])
def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, corpus_file, family, tokenizer):
    full = _train(tmp_path / "full", corpus_file, family, tokenizer)
    part = _train(tmp_path / "part", corpus_file, family, tokenizer, stop_after=5)
    assert part.stopped == "stop_after" and part.step == 5
    rest = _train(tmp_path / "part", corpus_file, resume=True)
    assert rest.step == full.step == TINY_TRAIN["steps"]
    resumed = part.losses + rest.losses
    assert [s for s, _ in resumed] == [s for s, _ in full.losses]
    # same data order, same optimizer state, same dropout seeds: bit-identical on CPU
    assert [l for _, l in resumed] == [l for _, l in full.losses]
    assert rest.final_eval["val_loss"] == full.final_eval["val_loss"]
    # the metrics log of the resumed run has each step once, like the uninterrupted one
    steps = [r["step"] for r in map(json.loads, (tmp_path / "part" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, TINY_TRAIN["steps"] + 1))


def test_training_writes_checkpoint_metrics_and_plot(tmp_path, corpus_file):
    res = _train(tmp_path / "run", corpus_file, steps=20, eval_interval=10, lr=3e-3)
    run = tmp_path / "run"
    assert res.losses[-1][1] < res.losses[0][1]  # it learns
    ckpt = read_checkpoint(run)
    assert ckpt.step == 20 and ckpt.has_optimizer
    assert ckpt.meta["tokenizer"] == "char"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]))
        assert r["val_bpb"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.tokens_per_s > 0
    # the final figure scores every validation token (in windows of block_size), not sampled batches
    final = [r for r in rows if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["step"] == 20
    lm = api.LM.load(run, quantize="none")
    meta = json.loads((run / "data" / "meta.json").read_text())
    val = torch.from_numpy(np.fromfile(run / "data" / "tokens.bin", dtype=meta["dtype"])[meta["n_train"]:].astype(np.int64))
    n_val = len(val)
    assert final[0]["val_all_tokens"] == n_val - 1
    T = lm.config.block_size
    nll = 0.0
    with torch.no_grad():
        for s in range(0, n_val - 1, T):
            x, y = val[s:min(s + T, n_val - 1)], val[s + 1:min(s + T, n_val - 1) + 1]
            nll += torch.nn.functional.cross_entropy(lm.model(x[None])[0][0], y, reduction="sum").item()
    assert final[0]["val_all_loss"] == pytest.approx(nll / (n_val - 1), rel=1e-5)
    assert res.final_eval["val_all_loss"] == final[0]["val_all_loss"]
    # no temporary folders left behind
    assert not [p for p in run.rglob(".*") if p.is_dir()]


def test_time_budget_stops_cleanly_with_a_checkpoint(tmp_path, corpus_file):
    res = _train(tmp_path / "run", corpus_file, steps=100_000, time_budget=1.5)
    assert res.stopped == "time budget"
    assert 0 < res.step < 100_000
    assert read_checkpoint(tmp_path / "run").step == res.step


def test_refuses_to_overwrite_a_run(tmp_path, corpus_file):
    _train(tmp_path / "run", corpus_file, steps=2)
    with pytest.raises(LMForgeError, match="already holds a training run"):
        _train(tmp_path / "run", corpus_file, steps=2)


def test_checkpoints_are_pruned_and_latest_is_loadable(tmp_path, corpus_file):
    _train(tmp_path / "run", corpus_file, steps=12, checkpoint_interval=3, keep_checkpoints=2)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step_0000009", "step_0000012"]
    lm = api.LM.load(tmp_path / "run")
    assert lm.checkpoint.step == 12
    assert len(lm.generate("The ", max_new_tokens=20, seed=0)) > 0


def test_eval_bits_per_byte_matches_loss(tmp_path, corpus_file):
    _train(tmp_path / "run", corpus_file, steps=10)
    lm = api.LM.load(tmp_path / "run")
    res = lm.evaluate([corpus_file])
    text = corpus_file.read_text(encoding="utf-8")
    assert res.tokens == len(text) - 1  # char model: every character but the first is scored once
    assert res.bytes == len(text.encode("utf-8")) - len(text[0].encode("utf-8"))
    assert res.bpb == pytest.approx(res.loss * res.tokens / (res.bytes * np.log(2)))


def test_bpe_model_generates_text_that_decodes(tmp_path, corpus_file):
    _train(tmp_path / "run", corpus_file, family="gru", tokenizer="bpe", steps=8)
    lm = api.LM.load(tmp_path / "run")
    out = lm.generate("def ", max_new_tokens=30, seed=1)
    assert isinstance(out, str) and len(out) > 0
    assert out == lm.generate("def ", max_new_tokens=30, seed=1)


def test_stop_strings_and_logprobs(tmp_path, corpus_file):
    _train(tmp_path / "run", corpus_file, steps=6)
    lm = api.LM.load(tmp_path / "run")
    full = lm.generate("The ", max_new_tokens=80, temperature=0, seed=0)
    stop = full[10:12]
    cut = lm.generate("The ", max_new_tokens=80, temperature=0, seed=0, stop=[stop])
    assert cut == full[: full.find(stop)]
    ids = lm.encode_prompt("The ")
    pairs = list(lm.engine.generate(ids, 5, api.SamplingParams(temperature=0), logprobs=True))
    assert len(pairs) == 5
    # each log-probability is the model's own: its log-softmax at that position of the full sequence
    seq = ids + [t for t, _ in pairs]
    with torch.no_grad():
        logp = lm.model(torch.tensor([seq]))[0][0].float().log_softmax(-1)
    for i, (tok, lp) in enumerate(pairs):
        assert lp == pytest.approx(float(logp[len(ids) - 1 + i, tok]), abs=1e-4)
        assert tok == int(logp[len(ids) - 1 + i].argmax())  # greedy took the most likely token
    with pytest.raises(LMForgeError, match="unknown sampling option"):
        lm.generate("The ", max_new_tokens=5, temprature=0.3)
