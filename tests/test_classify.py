"""Classification fine-tuning on a tiny random BERT (tests/conftest.py) with data made here:
it must learn a lexical rule, report honest held-out scores, and refuse bad input cleanly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmforge.encoders import Encoder
from lmforge.errors import LMForgeError
from lmforge.train.classify import ClassifyConfig, TextClassifier, finetune, read_rows, score
from lmforge.train.holdout import whole_text_split

from conftest import make_tiny_bert
from test_cli import run_cli

pytest.importorskip("transformers")

WORDS = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "poor", "awful", "wrong"],
         "code": ["def", "return", "class", "import"]}
FILLER = "the a of to in is and it for with as on by this that".split()


def rows(n: int, seed: int = 0, classes=("pos", "neg")) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = rng.sample(FILLER, 6) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def write(path, data, kind="csv"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in data), encoding="utf-8")
    else:
        sep = "\t" if kind == "tsv" else ","
        path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{lb}\n" for t, lb in data), encoding="utf-8")
    return path


FAST = dict(epochs=3, batch_size=16, lr=2e-3, head_lr=5e-3, max_len=24, eval_every=20)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_learns_a_lexical_rule_with_three_string_classes(bert, tmp_path, kind):
    data = write(tmp_path / f"train.{kind}", rows(480, classes=("pos", "neg", "code")), kind)
    out = tmp_path / "run"
    report = finetune(Encoder.load(bert), data, "text", "label", out, ClassifyConfig(**{**FAST, "epochs": 5}),
                      progress=False, log=lambda m: None)
    assert report["labels"] == ["code", "neg", "pos"] and report["val_rows"] == 48
    assert report["val_accuracy"] >= 0.85, report  # chance is 1/3
    for f in ("model.safetensors", "classifier.json", "tokenizer.json", "metrics.jsonl", "confusion.png",
              "confusion.txt", "report.json", "loss.png"):
        assert (out / f).is_file(), f
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["kind"] == "eval" and log[-1]["val_accuracy"] > 0.5
    train = [r for r in log if r["kind"] == "train"]  # the shared loop's log: loss, lr and rate every 10 steps
    assert [r["step"] for r in train][:3] == [10, 20, 30] and all(r["rows_per_s"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    clf = TextClassifier.load(out)
    test = rows(60, seed=7, classes=("pos", "neg", "code"))  # rows never seen in training
    s = clf.evaluate([t for t, _ in test], [lb for _, lb in test])
    assert s.accuracy >= 0.85 and np.array(s.confusion).sum() == 60
    preds = clf.predict([t for t, _ in rows(20, seed=11, classes=("pos",))])
    assert sum(p["label"] == "pos" for p in preds) >= 15  # unseen rows of one class
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)


def _is_span(row: str, text: str) -> bool:
    return f" {' '.join(row.lower().split())} " in f" {' '.join(text.lower().split())} "


def test_whole_text_split_holds_out_sentences_and_none_of_their_phrases():
    # SST-2's shape: sentences, plus phrases cut from them as rows of their own (in another case)
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(400)]
    sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 20))) for _ in range(200)]
    texts, labels = [], []
    for k, sent in enumerate(sentences):
        words, label = sent.split(), str(k % 2)
        texts.append(sent)
        labels.append(label)
        for _ in range(6):
            a = rng.randrange(len(words))
            b = rng.randint(a + 1, min(len(words), a + 6))
            texts.append(" ".join(words[a:b]).upper())
            labels.append(label)
    split = whole_text_split(texts, labels, 0.1, random.Random(0))
    assert split.whole == 200  # every phrase lies inside its sentence
    held = [texts[i] for i in split.val]
    assert set(held) <= set(sentences) and len(held) == 20
    assert sorted(labels[i] for i in split.val) == ["0"] * 10 + ["1"] * 10
    # no training row is part of a held-out sentence, and nothing else was left out
    for i in split.train:
        assert not any(_is_span(texts[i], h) for h in held), texts[i]
    rest = set(range(len(texts))) - set(split.val) - set(split.train)
    assert len(rest) == split.dropped > 20 and all(any(_is_span(texts[i], h) for h in held) for i in rest)


def test_whole_text_split_of_independent_rows_drops_only_copies():
    data = rows(100)
    texts, labels = [t for t, _ in data], [lb for _, lb in data]
    texts.append(texts[0].upper())  # a copy of a row, in another case
    labels.append(labels[0])
    for seed in range(20):
        split = whole_text_split(texts, labels, 0.1, random.Random(seed))
        assert split.whole == 101 and len(split.val) == 10
        copy_held = 0 in split.val or 100 in split.val
        assert split.dropped == (1 if copy_held and not (0 in split.val and 100 in split.val) else 0)
        assert len(split.train) + len(split.val) + split.dropped == 101


def test_scores_match_a_hand_count():
    s = score([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 3)
    assert s.accuracy == pytest.approx(4 / 6)
    f1 = [2 / 4, 4 / 5, 2 / 3]  # per class 2tp / (2tp + fp + fn): (1,1,1), (2,1,0), (1,0,1)
    assert s.macro_f1 == pytest.approx(sum(f1) / 3)
    assert s.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_cli_finetune_classify_and_eval(bert, tmp_path, capsys):
    train = write(tmp_path / "train.tsv", rows(320), "tsv")
    out = tmp_path / "run"
    args = ["finetune", "classify", "--model", bert, "--train", train, "--out", out, "--epochs", "3",
            "--batch-size", "16", "--lr", "0.002", "--max-len", "24", "--eval-every", "20"]
    code, o, err = run_cli(args, capsys)
    assert code == 0, err
    assert "validation: accuracy" in o and (out / "confusion.png").is_file()
    code, o, err = run_cli(["classify", out, "a great thing of the day"], capsys)
    assert code == 0 and o.split()[0] in ("pos", "neg") and "pos: " in o and "neg: " in o, (o, err)
    test = write(tmp_path / "test.csv", rows(40, seed=3))
    code, o, err = run_cli(["classify", out, "--eval", test], capsys)
    assert code == 0 and "accuracy" in o, err
    assert float(o.split("accuracy ")[1].split(",")[0]) >= 0.75, o  # unseen rows; chance is 0.5
    lines = tmp_path / "lines.txt"
    lines.write_text("good stuff\nbad stuff\n", encoding="utf-8")
    code, o, err = run_cli(["classify", out, "--in", lines], capsys)
    assert code == 0 and len(o.strip().splitlines()) == 2


def test_bad_inputs(bert, tmp_path, capsys):
    good = write(tmp_path / "good.csv", rows(40))
    cases = {
        "missing column": (["--text-col", "sentence"], "no column 'sentence'"),
        "single class": ([], "only one class"),
        "empty text": ([], "empty 'text'"),
        "bad encoding": ([], "not UTF-8"),
        "unseen label": (["--val", None], "never seen in training"),
        "missing file": ([], "no such file"),
    }
    (tmp_path / "single.csv").write_text("text,label\na good one,pos\nthe good,pos\n", encoding="utf-8")
    (tmp_path / "empty.csv").write_text("text,label\na good one,pos\n   ,neg\n", encoding="utf-8")
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9 good,pos\n".encode("latin-1"))
    write(tmp_path / "val.csv", [("a thing", "other")])
    files = {"missing column": good, "single class": tmp_path / "single.csv", "empty text": tmp_path / "empty.csv",
             "bad encoding": tmp_path / "latin.csv", "unseen label": good, "missing file": tmp_path / "nope.csv"}
    for name, (extra, msg) in cases.items():
        extra = [str(tmp_path / "val.csv") if e is None else e for e in extra]
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code, o, err = run_cli(["finetune", "classify", "--model", bert, "--train", files[name], "--out", out,
                                *extra], capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (name, err)
        assert not out.exists(), name  # nothing written half-way
    (tmp_path / "list.jsonl").write_text('{"text": "good", "label": "pos"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(LMForgeError, match="list.jsonl:2: not a JSON object"):
        read_rows(tmp_path / "list.jsonl", "text", "label")
    texts, labels = read_rows(tmp_path / "empty.csv", "text", "label", skip_empty=True)
    assert texts == ["a good one"] and labels == ["pos"]
    clf_dir = tmp_path / "clf"
    finetune(Encoder.load(bert), good, "text", "label", clf_dir, ClassifyConfig(**{**FAST, "epochs": 1}),
             progress=False, log=lambda m: None)
    (clf_dir / "tokenizer.json").write_text("{ not json", encoding="utf-8")
    code, o, err = run_cli(["classify", clf_dir, "hello"], capsys)
    assert code == 1 and "not a tokenizer.json" in err and "Traceback" not in err, err
    code, o, err = run_cli(["classify", bert, "hello"], capsys)  # an encoder folder is not a classifier
    assert code == 1 and "not an lmforge classifier" in err
    with pytest.raises(LMForgeError, match="already exists"):
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x").write_text("x")
        finetune(Encoder.load(bert), good, "text", "label", tmp_path / "busy", ClassifyConfig(), progress=False)


def test_zero_shot_baseline(bert, tmp_path, capsys):
    from lmforge.encoders import zero_shot

    enc = Encoder.load(bert)
    # a text equal to a description has cosine 1 with it: that label must win, whatever the
    # (random) encoder does with other texts
    out = zero_shot(enc, ["good great", "def return class import"], {"code": "def return class import", "pos": "good great"})
    assert [r["label"] for r in out] == ["pos", "code"]
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in out)
    with pytest.raises(LMForgeError, match="at least two labels"):
        zero_shot(enc, ["x"], {"only": "one"})
    code, o, err = run_cli(["classify", bert, "good great", "--zero-shot", "pos=good great,neg=bad awful"], capsys)
    assert code == 0 and o.startswith("pos"), (o, err)


def test_time_budget_ends_the_schedule_on_the_clock(bert, tmp_path):
    data = write(tmp_path / "train.csv", rows(480))
    out = tmp_path / "run"
    report = finetune(Encoder.load(bert), data, "text", "label", out,
                      ClassifyConfig(**{**FAST, "epochs": 1000, "eval_every": 10_000, "patience": 100_000,
                                        "time_budget": 3.0}),
                      progress=False, log=lambda m: None)
    assert report["stopped"] == "time budget" and 0 < report["steps"] < 1000 * 27
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if r["kind"] == "train"]
    assert lrs[-1] < 0.5 * max(lrs)  # the linear decay followed the clock, not the 27,000 planned steps
    assert log[-1]["kind"] == "eval" and log[-1]["step"] == report["steps"]  # the last weights were validated


def test_lora_trains_only_adapters_and_merges(bert, tmp_path):
    import torch

    from lmforge.models.lora import LoRALinear, add_lora, merge_lora

    lin = torch.nn.Linear(8, 4)
    wrapped = LoRALinear(lin, rank=2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(wrapped(x), lin(x))  # B starts at zero: the pretrained function
    with torch.no_grad():
        wrapped.lora_b.normal_()
    expected = wrapped(x)
    torch.testing.assert_close(wrapped.merged()(x), expected, atol=1e-5, rtol=1e-5)

    enc = Encoder.load(bert)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    data = write(tmp_path / "train.csv", rows(320))
    cfg = ClassifyConfig(**{**FAST, "lora_rank": 8, "lr": 1e-2, "head_lr": 1e-2, "epochs": 16, "eval_every": 40})
    report = finetune(enc, data, "text", "label", tmp_path / "run", cfg, progress=False, log=lambda m: None)
    assert report["val_accuracy"] >= 0.8, report
    clf = TextClassifier.load(tmp_path / "run")  # merged: a plain encoder, loadable without LoRA code
    after = clf.model.encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("qkv_proj.weight" in k or "o_proj.weight" in k for k in changed), changed
    assert add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), targets=("0",)) == 1
    m = torch.nn.Sequential(LoRALinear(torch.nn.Linear(2, 2)))
    merge_lora(m)
    assert isinstance(m[0], torch.nn.Linear)


@pytest.mark.parametrize("family,pooling", [("gpt", "mean"), ("lstm", "last")])
def test_head_on_an_lmforge_trained_backbone(tmp_path, capsys, family, pooling):
    """The same head on a tiny GPT / LSTM trained here (item 4 of the issue): it learns the rule,
    saves, and loads back to the same predictions."""
    from lmforge import api

    from conftest import TINY_TRAIN, pydoc_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pydoc_text(20_000), encoding="utf-8")
    run = tmp_path / "lm"
    api.train(run, model=family, data=[str(corpus)], preset="tiny", show_progress=False, log=lambda *_: None,
              train_overrides=dict(TINY_TRAIN, steps=4))
    data = write(tmp_path / "train.csv", rows(320))
    out = tmp_path / "clf"
    code, o, err = run_cli(["finetune", "classify", "--model", run, "--train", data, "--out", out, "--epochs", "6",
                            "--batch-size", "16", "--lr", "0.003", "--max-len", "48", "--eval-every", "40",
                            "--pooling", pooling], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["val_accuracy"] >= 0.75, report
    clf = TextClassifier.load(out)
    assert clf.model.causal and json.loads((out / "classifier.json").read_text())["backbone"] == "lm"
    test = rows(40, seed=5)
    s = clf.evaluate([t for t, _ in test], [lb for _, lb in test])
    assert s.accuracy >= 0.7


def test_resume_is_exact(bert, tmp_path, capsys):
    """Interrupted after 13 steps (last checkpoint at step 10), then resumed: the same model as
    one uninterrupted run, bit for bit; the checkpoint folder goes away at the end."""
    from safetensors.torch import load_file

    from lmforge.train.classify import partial_dir

    data = write(tmp_path / "train.csv", rows(320))
    cfg = dict(FAST, eval_every=5, epochs=2)
    whole = finetune(Encoder.load(bert), data, "text", "label", tmp_path / "a", ClassifyConfig(**cfg),
                     progress=False, log=lambda m: None)
    stopped = finetune(Encoder.load(bert), data, "text", "label", tmp_path / "b", ClassifyConfig(**cfg),
                       progress=False, log=lambda m: None, stop_after=13)
    assert stopped["stopped_at"] == 13 and not (tmp_path / "b").exists() and partial_dir(tmp_path / "b").is_dir()
    with pytest.raises(LMForgeError, match="add --resume"):
        finetune(Encoder.load(bert), data, "text", "label", tmp_path / "b", ClassifyConfig(**cfg), progress=False)
    code, o, err = run_cli(["finetune", "classify", "--model", bert, "--train", data, "--out", tmp_path / "b",
                            "--resume", "--epochs", "2"], capsys)  # other settings than the interrupted run
    assert code == 1 and "settings differ" in err, err
    said = []
    finetune(Encoder.load(bert), data, "text", "label", tmp_path / "b", ClassifyConfig(**cfg), progress=False,
             log=said.append, resume=True)
    assert any("resuming at step 10" in m for m in said), said
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "report.json").read_text())["val_accuracy"] == whole["val_accuracy"]
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == (tmp_path / "b" / "metrics.jsonl").read_text().count("\n")
    assert not partial_dir(tmp_path / "b").exists()
    code, o, err = run_cli(["finetune", "classify", "--model", bert, "--train", data, "--out", tmp_path / "c",
                            "--resume"], capsys)
    assert code == 1 and "nothing to resume" in err


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(bert, tmp_path, monkeypatch):
    """Ctrl-C at step 7 (between validations): the loop checkpoints that very step, and
    --resume from it ends with the same weights as an uninterrupted run."""
    from safetensors.torch import load_file

    from lmforge.train import classify

    data = write(tmp_path / "train.csv", rows(200))
    cfg = dict(FAST, eval_every=5, epochs=1)
    finetune(Encoder.load(bert), data, "text", "label", tmp_path / "a", ClassifyConfig(**cfg), progress=False,
             log=lambda m: None)
    real = classify._ClassifyTask.batch

    def batch(self, step, micro):
        if step == 7:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(classify._ClassifyTask, "batch", batch)
    with pytest.raises(LMForgeError, match="interrupted at step 7"):
        finetune(Encoder.load(bert), data, "text", "label", tmp_path / "b", ClassifyConfig(**cfg), progress=False,
                 log=lambda m: None)
    monkeypatch.setattr(classify._ClassifyTask, "batch", real)
    said = []
    finetune(Encoder.load(bert), data, "text", "label", tmp_path / "b", ClassifyConfig(**cfg), progress=False,
             log=said.append, resume=True)
    assert any("resuming at step 7" in m for m in said), said
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)


# ---------------------------------------------------------------- a head on a frozen decoder
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random 4-layer LLaMA-style decoder (128 wide) with a byte-level BPE tokenizer, as a GGUF
    file: the kind of source (like gemma3-270m) that classification keeps frozen."""
    from conftest import tiny_chat_lm
    from test_gguf import write_gguf

    import torch

    lm = tiny_chat_lm(stop=False)
    torch.manual_seed(0)
    lm.model.init_weights()  # the usual small initial weights: its states still carry the words
    path = tmp_path_factory.mktemp("dec") / "tiny.gguf"
    write_gguf(path, lm.model, lm.tokenizer)
    return path


def test_upto_stops_at_a_layer_with_the_states_of_the_full_pass():
    import torch

    from conftest import tiny_chat_lm

    model = tiny_chat_lm(stop=False).model
    x = torch.randint(0, 300, (2, 9))
    with torch.inference_mode():
        full = model(x, return_hidden=True, output_hidden_states=True)[2]["hidden_states"]
        part = model(x, return_hidden=True, output_hidden_states=True, upto=2)
    assert part[0] is None and len(part[2]["hidden_states"]) == 3 and len(full) == model.config.n_layer + 1
    for a, b in zip(part[2]["hidden_states"], full):
        assert torch.equal(a, b)


def test_frozen_decoder_features_are_mean_and_last_states(tiny_gguf):
    """Features by hand for one text: the layer's states averaged over the prompt's tokens and at
    its last token; a batch with texts of other lengths (right padding) gives the same numbers."""
    import torch

    from lmforge.encoders import DecoderFeatures, default_layers

    assert default_layers(18) == list(range(6, 13)) and default_layers(30) == list(range(10, 21))
    assert default_layers(2) == [1] and default_layers(4) == [1, 2, 3]
    feats = DecoderFeatures(tiny_gguf, "cpu", [3, 1], "Text: {text}\nLabel:", 64)
    assert feats.layers == [1, 3]
    text = "a good thing of the day"
    ids = feats.tokenize([text])[0]
    assert feats.lm.tokenizer.decode(ids) == f"Text: {text}\nLabel:"
    with torch.inference_mode():
        hs = feats.lm.model(torch.tensor([ids]), return_hidden=True, output_hidden_states=True)[2]["hidden_states"]
    want = torch.cat([t for L in (1, 3) for t in (hs[L][0].mean(0), hs[L][0, -1])]).numpy()
    got = feats.features(["x", text, "a much longer text than the other two, with many more tokens in it"])
    assert got.shape == (3, feats.dim) and feats.dim == 4 * 128
    np.testing.assert_allclose(got[1], want, rtol=1e-4, atol=1e-4)
    long = feats.tokenize(["word " * 200])[0]  # too long: the text loses its end, the template keeps its question
    assert len(long) == 64 and feats.lm.tokenizer.decode(long).endswith("\nLabel:")


def test_head_on_a_frozen_gguf_decoder(tiny_gguf, tmp_path, capsys):
    """finetune classify on a decoder GGUF keeps it frozen and fits a linear head on its states:
    the lexical rule is learnt, the folder reloads to the same probabilities, and labels text."""
    data = write(tmp_path / "train.csv", rows(300))
    out = tmp_path / "clf"
    code, o, err = run_cli(["finetune", "classify", "--model", tiny_gguf, "--train", data, "--out", out,
                            "--prompt", r"Text: {text}\nLabel:", "--layers", "1,3"], capsys)
    assert code == 0, err
    assert "frozen" in o and "L2 0.1:" in o and "heads averaged" in o
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["backbone"] == "frozen-lm" and meta["features"]["template"] == "Text: {text}\nLabel:"
    assert meta["features"]["layers"] == [1, 3] and (out / "loss.png").is_file() and (out / "confusion.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["val_accuracy"] >= 0.95, report  # chance is 0.5
    clf = TextClassifier.load(out, device="cpu")
    test = rows(100, seed=7)
    s = clf.evaluate([t for t, _ in test], [lb for _, lb in test])
    assert s.accuracy >= 0.95, s
    again = TextClassifier.load(out, device="cpu")
    texts = [t for t, _ in test[:5]]
    np.testing.assert_allclose(clf.predict_proba(texts), again.predict_proba(texts), rtol=1e-5, atol=1e-6)
    code, o, err = run_cli(["classify", out, "what a great day of the year"], capsys)
    assert code == 0 and o.split()[0] in ("pos", "neg"), err
    import torch

    x = (torch.from_numpy(clf.feats.features(texts)) - clf.mean) / clf.std  # the heads' average, by hand
    assert clf.w.shape[0] == len(meta["l2"]) == 5
    by_hand = np.mean([torch.softmax(x @ clf.w[g] + clf.b[g], -1).numpy() for g in range(5)], 0)
    np.testing.assert_allclose(clf.predict_proba(texts), by_hand, rtol=1e-5, atol=1e-6)


def test_frozen_decoder_refuses_what_does_not_apply(tiny_gguf, bert, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    data = write(tmp_path / "train.csv", rows(120))
    base = ["finetune", "classify", "--train", data, "--out", tmp_path / "o"]
    for extra, msg in [(["--model", tiny_gguf, "--prompt", "no slot"], "must contain {text}"),
                       (["--model", tiny_gguf, "--layers", "2,9"], "layers must be between 1 and 4"),
                       (["--model", tiny_gguf, "--layers", "a,b"], "comma-separated whole numbers"),
                       (["--model", tiny_gguf, "--max-len", "12", "--prompt", "{text} " + "and so on " * 8],
                        "the prompt template alone takes 12 tokens or more"),
                       (["--model", tiny_gguf, "--lora", "4"], "stays frozen"),
                       (["--model", tiny_gguf, "--resume"], "nothing to resume"),
                       (["--model", bert, "--prompt", "{text}"], "apply to a pretrained decoder")]:
        code, o, err = run_cli(base + extra, capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "o").exists()
    out = tmp_path / "clf"
    code, o, err = run_cli(["finetune", "classify", "--model", tiny_gguf, "--train", data, "--out", out], capsys)
    assert code == 0, err
    good = (out / "head.safetensors").read_bytes()
    head = load_file(str(out / "head.safetensors"))
    save_file({**head, "weight": head["weight"][:-1].contiguous()}, str(out / "head.safetensors"))
    code, o, err = run_cli(["classify", out, "hello"], capsys)
    assert code == 1 and "does not match classifier.json" in err and "Traceback" not in err, err
    (out / "head.safetensors").write_bytes(b"\0" * 64)
    code, o, err = run_cli(["classify", out, "hello"], capsys)
    assert code == 1 and "missing or corrupt" in err and "Traceback" not in err, err
    (out / "head.safetensors").write_bytes(good)
    meta = json.loads((out / "classifier.json").read_text())
    assert len(meta["features"]["model_sha256"]) == 64
    meta["features"]["model_sha256"] = "0" * 64  # as if the GGUF under that name had been replaced
    (out / "classifier.json").write_text(json.dumps(meta))
    code, o, err = run_cli(["classify", out, "hello"], capsys)
    assert code == 1 and "features of another file" in err and "Traceback" not in err, err


def test_drop_phrases_trains_on_whole_texts_only(tmp_path):
    from lmforge.train.classify import _rows
    from lmforge.train.holdout import whole_texts

    texts = ["a truly good film", "truly good", "good film", "a bad plot", "bad plot", "plot", "the end of it"]
    assert whole_texts(texts) == [0, 3, 6]
    p = write(tmp_path / "t.csv", list(zip(texts, ["pos", "pos", "pos", "neg", "neg", "neg", "neg"])))
    val = write(tmp_path / "v.csv", [("fine", "pos"), ("poor", "neg")])
    r = _rows(p, "text", "label", ClassifyConfig(drop_phrases=True), val)
    assert r.texts == ["a truly good film", "a bad plot", "the end of it"] and r.dropped == 4
    assert _rows(p, "text", "label", ClassifyConfig(), val).texts == texts


# ---------------------------------------------------------------- tuning a decoder's feature layers
def test_run_layers_continues_the_forward_pass(tiny_gguf):
    """From a stored state entering layer 1, the layers above give forward's states exactly, and
    the features pooled from them are features()' (with the last layer, normed as there)."""
    import torch

    from lmforge.encoders import DecoderFeatures

    feats = DecoderFeatures(tiny_gguf, "cpu", [1, 3], "Text: {text}\nLabel:", 64, quantize="none")
    model = feats.lm.model
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        full = model(x, return_hidden=True, output_hidden_states=True)[2]["hidden_states"]
        run = model.run_layers(full[1], 1, 4)
    assert len(run) == 4 and len(full) == 5  # forward's last state is the normed output of layer 3
    for a, b in zip(run[1:3], full[2:4]):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model.norm(run[3]), full[4])
    texts = ["x", "a good thing of the day", "a much longer text than the other two, with many more tokens"]
    for layers in ([1, 3], [2, 4]):
        feats.layers = layers
        states = feats.states(texts)
        assert [len(s) for s in states] == [len(i) for i in feats.tokenize(texts)]
        with torch.no_grad():
            np.testing.assert_allclose(feats.pool(states).numpy(), feats.features(texts), rtol=1e-5, atol=1e-5)


def test_tune_trains_the_feature_layers_and_reloads(tiny_gguf, tmp_path, capsys):
    """--tune trains the layers between the first and last feature layer with the head: the
    held-out loss falls below the probe's, the rule is learnt, only those layers change and are
    saved, and the folder reloads to the tuned model (its probabilities by hand from the saved
    layers and head)."""
    import torch
    from safetensors.torch import load_file

    from lmforge.api import LM

    data = write(tmp_path / "train.csv", rows(300))
    out = tmp_path / "clf"
    code, o, err = run_cli(["finetune", "classify", "--model", tiny_gguf, "--train", data, "--out", out,
                            "--layers", "1,3", "--tune", "--epochs", "3", "--lr", "3e-4"], capsys)
    assert code == 0, err
    assert "tuning layers 1-2" in o and "lr 0.0003" in o and "of 16" in o  # --tune's batch default
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["tuned_layers"] == [1, 2] and meta["train"]["tune"] is True
    lines = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    probe = next(r for r in lines if r["kind"] == "probe" and r.get("l2") == "average")
    evals = [r for r in lines if r["kind"] == "eval"]
    assert len(evals) == 3 and [r["epoch"] for r in evals] == [1, 2, 3]  # one validation per epoch
    assert evals[-1]["val_loss"] < 0.8 * probe["val_loss"], (probe, evals)  # fits held-out rows better
    assert len([r for r in lines if r["kind"] == "train"]) >= 5
    report = json.loads((out / "report.json").read_text())
    assert report["val_accuracy"] >= 0.95, report
    saved = load_file(str(out / "layers.safetensors"))
    assert {k.split(".")[1] for k in saved} == {"1", "2"}
    base = LM.load(tiny_gguf, device="cpu", quantize="none").model.state_dict()
    assert all(not torch.equal(saved[k], base[k]) for k in saved if k.endswith("qkv_proj.weight"))
    clf = TextClassifier.load(out, device="cpu")
    now = clf.feats.lm.model.state_dict()
    for k, v in now.items():  # the saved layers in, everything else the GGUF's
        assert torch.equal(v, saved[k] if k in saved else base[k]), k
    test = rows(100, seed=7)
    assert clf.evaluate([t for t, _ in test], [lb for _, lb in test]).accuracy >= 0.95
    texts = [t for t, _ in test[:6]]
    head = load_file(str(out / "head.safetensors"))
    assert head["weight"].shape[0] == 1
    with torch.no_grad():
        z = (clf.feats.pool(clf.feats.states(texts)) - head["mean"]) / head["std"]
        by_hand = torch.softmax(z @ head["weight"][0] + head["bias"][0], -1).numpy()
    np.testing.assert_allclose(clf.predict_proba(texts), by_hand, rtol=1e-5, atol=1e-6)


def test_tune_refusals(tiny_gguf, bert, tmp_path, capsys):
    data = write(tmp_path / "train.csv", rows(120))
    base = ["finetune", "classify", "--train", data, "--out", tmp_path / "o", "--tune"]
    for extra, msg in [(["--model", bert], "apply to a pretrained decoder"),
                       (["--model", tiny_gguf, "--time-budget", "1m"], "--tune runs its --epochs"),
                       (["--model", tiny_gguf, "--lr", "nan"], "lr must be a finite positive number"),
                       (["--model", tiny_gguf, "--batch-size", "0"], "--batch-size must be positive"),
                       (["--model", tiny_gguf, "--layers", "2"], "have none between them")]:
        code, o, err = run_cli(base + extra, capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "o").exists()
    out = tmp_path / "clf"
    code, o, err = run_cli(["finetune", "classify", "--model", tiny_gguf, "--train", data, "--out", out,
                            "--layers", "2,3", "--tune", "--epochs", "1"], capsys)
    assert code == 0, err
    from safetensors.torch import load_file, save_file

    saved = load_file(str(out / "layers.safetensors"))
    key = next(iter(saved))
    save_file({k: v for k, v in saved.items() if k != key}, str(out / "layers.safetensors"))
    code, o, err = run_cli(["classify", out, "hello"], capsys)
    assert code == 1 and "does not hold layers 2-2" in err and "Traceback" not in err, err
    (out / "layers.safetensors").write_bytes(b"\0" * 64)
    code, o, err = run_cli(["classify", out, "hello"], capsys)
    assert code == 1 and "missing or corrupt" in err and "Traceback" not in err, err
