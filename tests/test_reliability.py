"""What a sweep of damaged files, impossible numbers, signals and bad flags found: each ends in a
one-line `error:` and a non-zero exit, or is repaired, never a traceback or garbage."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import store
from lmforge.api import LM
from lmforge.cli import main
from lmforge.config import ModelConfig, TrainConfig
from lmforge.engine import SamplingParams
from lmforge.errors import LMForgeError

pytest.importorskip("gguf")
from test_gguf import bpe_tokenizer, llama_config, write_gguf  # noqa: E402
from test_store import local_registry  # noqa: E402,F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") or "Error" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_derived_store_files_are_checked_and_rebuilt(local_registry):  # noqa: F811
    """Flipping 4 KB of the quantized copy, or swapping two ids in the converted tokenizer, is
    noticed on load: the file is made again from the checked GGUF and the output is unchanged."""
    stored = store.pull("tiny-test", log=lambda *_: None)
    ref = LM.load("tiny-test")
    ids = ref.tokenizer.encode("hello world, 你好")
    want = list(ref.engine.generate(ids, 8, SamplingParams(temperature=0)))
    w = stored.path / "int8.safetensors"
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    w.write_bytes(bytes(data))
    again = LM.load("tiny-test")
    assert list(again.engine.generate(ids, 8, SamplingParams(temperature=0))) == want
    assert w.read_bytes() != bytes(data)  # rebuilt
    tj = stored.path / "tokenizer.json"
    doc = json.loads(tj.read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tj.write_text(json.dumps(doc), encoding="utf-8")
    fixed = LM.load("tiny-test")
    assert fixed.tokenizer.encode("hello world, 你好") == ids
    assert json.loads(tj.read_text(encoding="utf-8"))["model"]["vocab"][a] != vocab[a]


@pytest.mark.parametrize("overrides,needle", [
    ({"n_layer": 1_000_000}, "n_layer"),
    ({"n_layer": 2 ** 32 - 1}, "n_layer"),
    ({"n_kv_head": 0}, "n_kv_head"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"norm_eps": float("nan")}, "norm_eps"),
    ({"norm_eps": float("inf")}, "norm_eps"),
    ({"norm_eps": -1.0}, "norm_eps"),
])
def test_impossible_model_numbers_are_refused(overrides, needle):
    base = dict(family="gpt", vocab_size=100, n_layer=2, n_head=4, n_embd=32, pos="rope", norm="rmsnorm")
    with pytest.raises(LMForgeError, match=needle):
        ModelConfig(**{**base, **overrides})


def _small_gguf(tmp_path) -> Path:
    from lmforge.models import build_model

    tok = bpe_tokenizer()
    return write_gguf(tmp_path / "m.gguf", build_model(llama_config(tok.vocab_size)).eval(), tok)


def _edit_in_place(path: Path, key: str, value) -> None:
    """Overwrite one scalar metadata value of a GGUF file where it lies (gguf's reader, r+)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader


@pytest.mark.parametrize("key,value,needle", [
    ("llama.block_count", 1_000_000, "n_layer"),
    ("llama.attention.head_count_kv", 0, "n_kv_head"),
    ("llama.rope.freq_base", float("nan"), "rope_theta"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "norm_eps"),
])
def test_gguf_metadata_is_checked_before_anything_is_allocated(tmp_path, key, value, needle):
    bad = _small_gguf(tmp_path)
    _edit_in_place(bad, key, value)
    with pytest.raises(LMForgeError, match=needle):
        LM.load(bad)
    r = run_cli(["generate", str(bad), "hi", "--max-tokens", "2"])
    one_line_error(r, needle)


def test_one_flipped_byte_in_the_token_table_is_a_clear_error(tmp_path):
    """The merges then name a piece the vocabulary no longer has."""
    import gguf

    path = _small_gguf(tmp_path)
    reader = gguf.GGUFReader(str(path), "r+")
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    piece = next(m.split(" ")[0] for m in merges if m.split(" ")[0].isascii() and m.split(" ")[0].isalpha())
    field = reader.fields["tokenizer.ggml.tokens"]
    for idx in field.data:
        part = field.parts[idx]
        if bytes(part) == piece.encode():
            part[-1] = ord("~")  # still valid UTF-8, now a piece no merge expects
            break
    else:
        pytest.fail("the merged piece is not in the token table")
    reader.data.flush()
    del reader
    with pytest.raises(LMForgeError, match="vocabulary is inconsistent"):
        LM.load(path)


def test_tensor_data_off_its_alignment_is_refused(tmp_path):
    import gguf

    path = _small_gguf(tmp_path)
    reader = gguf.GGUFReader(str(path), "r+")
    reader.tensors[1].field.parts[-1][0] += 4  # the second tensor's data offset, moved off the alignment
    reader.data.flush()
    del reader
    with pytest.raises(LMForgeError, match="alignment"):
        LM.load(path)


@pytest.mark.parametrize("args,needle", [
    (["generate", "NAME", "hi", "--temperature", "nan"], "temperature"),
    (["generate", "NAME", "hi", "--top-p", "nan"], "top p"),
    (["generate", "NAME", "hi", "--max-tokens", "100000000000"], "max new tokens"),
])
def test_bad_generation_flags_are_one_line_errors(tmp_path, args, needle):
    path = _small_gguf(tmp_path)
    one_line_error(run_cli([a if a != "NAME" else str(path) for a in args]), needle)


@pytest.mark.parametrize("override,needle", [
    ({"lr": math.nan}, "lr"), ({"checkpoint_interval": -1}, "checkpoint_interval"),
    ({"steps": 10 ** 22}, "steps"), ({"min_lr": math.inf}, "min_lr"), ({"time_budget": math.inf}, "time budget"),
])
def test_impossible_training_numbers_are_refused(override, needle):
    with pytest.raises(LMForgeError, match=needle):
        TrainConfig(**override)


def test_train_flags_and_out_that_is_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_line_error(run_cli(["train", "--out", str(f), "--steps", "2"]), "is a file")
    one_line_error(run_cli(["train", "--lr", "nan", "--steps", "2", "--out", str(tmp_path / "r")]), "lr")
    one_line_error(run_cli(["train", "--checkpoint-interval", "-1", "--steps", "2", "--out", str(tmp_path / "r2")]),
                   "checkpoint_interval")


def test_resume_refuses_every_option_that_contradicts_the_run(tmp_path, corpus_file):
    from lmforge import api
    from conftest import TINY_TRAIN

    out = tmp_path / "run"
    api.train(out, model="gpt", preset="tiny", data=[str(corpus_file)], show_progress=False, log=lambda *_: None,
              train_overrides=dict(TINY_TRAIN, steps=4))
    for kw, name in (({"model": "lstm"}, "model"), ({"tokenizer": "bpe"}, "tokenizer"), ({"preset": "small"}, "preset"),
                     ({"vocab_size": 512}, "vocab_size")):
        with pytest.raises(LMForgeError, match=f"cannot change the model when resuming.*{name}"):
            api.train(out, resume=True, show_progress=False, log=lambda *_: None, **kw)
    # the same family as the run is not a contradiction
    api.train(out, resume=True, model="gpt", show_progress=False, log=lambda *_: None, train_overrides={"steps": 5})


def test_sigterm_during_training_saves_a_checkpoint_to_resume_from(tmp_path, corpus_file):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "train", "--out", str(out), "--data", str(corpus_file),
                             "--preset", "tiny", "--steps", "100000", "--quiet", "--sample-tokens", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.2)
        time.sleep(1.0)  # a few steps in
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr, stderr
    assert (out / "latest").exists(), stdout + stderr
    assert "--resume" in stdout + stderr


def test_half_written_checkpoints_are_cleaned_on_resume(tmp_path, corpus_file):
    from lmforge import api
    from conftest import TINY_TRAIN

    out = tmp_path / "run"
    api.train(out, model="gpt", preset="tiny", data=[str(corpus_file)], show_progress=False, log=lambda *_: None,
              train_overrides=dict(TINY_TRAIN, steps=3))
    junk = out / "checkpoints" / ".step_0000009.tmp-abc123"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    api.train(out, resume=True, show_progress=False, log=lambda *_: None, train_overrides={"steps": 4})
    assert not junk.exists()


def test_index_add_refuses_devices_and_leaves_no_empty_collection(tmp_path):
    home = tmp_path / "home"
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    for target in ("/dev/zero", str(link)):
        r = run_cli(["index", "add", target, "--collection", "z", "--embed", "none"], env={"LMFORGE_HOME": str(home)})
        one_line_error(r, "not a regular file")
    assert not (home / "collections" / "z").exists()


def test_ask_with_an_impossible_max_tokens_says_what_is_wrong(tmp_path, corpus_file):
    env = {"LMFORGE_HOME": str(tmp_path / "home")}
    assert run_cli(["index", "add", str(corpus_file), "--collection", "c", "--embed", "none"], env=env).returncode == 0
    path = _small_gguf(tmp_path)
    r = run_cli(["ask", "What is a list?", "--collection", "c", "--model", str(path), "--max-tokens", "100000000000"],
                env=env)
    one_line_error(r, "--max-tokens", "context")
