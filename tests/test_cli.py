"""The command line: help, an end-to-end run, and every bad input giving a clear one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import api
from lmforge.cli import main, parse_duration
from lmforge.errors import LMForgeError

from conftest import TINY_TRAIN


def run_cli(args, capsys):
    """Run the real entry point in-process; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, pattern, expected_code=1):
    assert code == expected_code
    assert pattern in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    from conftest import pydoc_text

    data = run.parent / "data.txt"
    data.write_text(pydoc_text(30_000), encoding="utf-8")
    api.train(run, model="gpt", data=[str(data)], preset="tiny", show_progress=False, log=lambda *_: None,
              train_overrides=dict(TINY_TRAIN, steps=6))
    return run


@pytest.mark.parametrize("cmd", [[], ["train"], ["generate"], ["eval"]])
def test_help(cmd, capsys):
    code, out, _ = run_cli([*cmd, "--help"], capsys)
    assert code == 0 and "Usage" in out


def test_end_to_end_train_generate_eval_in_a_subprocess(tmp_path, corpus_file):
    exe = [sys.executable, "-m", "lmforge"]
    r = subprocess.run([*exe, "train", "--model", "lstm", "--tokenizer", "bpe", "--vocab-size", "300", "--preset",
                        "tiny", "--steps", "10", "--data", str(corpus_file), str(corpus_file), "--out",
                        str(tmp_path / "run"), "--sample-tokens", "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sample" in r.stdout and "bits/byte" in r.stdout
    r = subprocess.run([*exe, "generate", str(tmp_path / "run"), "def", "--max-tokens", "10", "--seed", "3",
                        "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def") and len(r.stdout) > 4
    r = subprocess.run([*exe, "eval", str(tmp_path / "run"), "--data", str(corpus_file)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bits per byte" in r.stdout


def test_missing_data(tmp_path, capsys):
    code, _, err = run_cli(["train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "r"], capsys)
    assert_clean_error(code, err, "data path does not exist")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_empty_data(tmp_path, capsys, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(["train", "--tokenizer", tokenizer, "--data", tmp_path / "empty.txt", "--out",
                            tmp_path / "r"], capsys)
    assert_clean_error(code, err, "empty")
    assert not (tmp_path / "r").exists()


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, _, err = run_cli(["train", "--data", tmp_path / "d", "--out", tmp_path / "r"], capsys)
    assert_clean_error(code, err, "no text files")


def test_non_utf8_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1") * 50)
    code, _, err = run_cli(["train", "--data", bad, "--out", tmp_path / "r", "--preset", "tiny"], capsys)
    assert_clean_error(code, err, "is not UTF-8 text")
    assert "latin1.txt" in err
    assert not (tmp_path / "r").exists()


def test_too_little_data_for_the_context(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("just a few words of text\n")
    code, _, err = run_cli(["train", "--data", small, "--out", tmp_path / "r", "--preset", "tiny"], capsys)
    assert_clean_error(code, err, "not enough text")
    assert not (tmp_path / "r").exists()


def test_corrupt_checkpoint_weights(tmp_path, trained, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(api.LM.load(trained).checkpoint.path, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    code, _, err = run_cli(["generate", bad, "The"], capsys)
    assert_clean_error(code, err, "corrupt")
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)  # garbage
    code, _, err = run_cli(["generate", bad, "The"], capsys)
    assert_clean_error(code, err, "corrupt")


def test_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "hf_model"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(["generate", foreign, "hi"], capsys)  # read as a Hugging Face folder, incomplete
    assert_clean_error(code, err, "tokenizer.json is missing")
    code, _, err = run_cli(["eval", tmp_path, "--data", foreign / "config.json"], capsys)
    assert_clean_error(code, err, "not an lmforge checkpoint")
    code, _, err = run_cli(["generate", foreign / "config.json", "hi"], capsys)
    assert_clean_error(code, err, "is a file")


def test_checkpoint_with_mismatched_config(tmp_path, trained, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(api.LM.load(trained).checkpoint.path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["n_embd"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["generate", bad, "The"], capsys)
    assert_clean_error(code, err, "shape")


def test_prompt_with_unknown_characters(trained, capsys):
    code, out, err = run_cli(["generate", trained, "你好"], capsys)
    assert_clean_error(code, err, "never saw")
    assert out == ""  # nothing printed before the error


def test_eval_data_with_unknown_characters(tmp_path, trained, capsys):
    f = tmp_path / "zh.txt"
    f.write_text("床前明月光\n" * 10, encoding="utf-8")
    code, _, err = run_cli(["eval", trained, "--data", f], capsys)
    assert_clean_error(code, err, "never saw")


@pytest.mark.parametrize("args,pattern", [
    (["train", "--bogus"], "No such option"),
    (["train", "--model", "transformerxl"], "not one of"),
    (["train", "--steps", "many"], "Invalid value for '--steps'"),
    (["generate"], "Missing argument"),
    (["frobnicate"], "No such command"),
])
def test_bad_flags_exit_2_without_traceback(args, pattern, capsys):
    code, out, err = run_cli(args, capsys)
    assert_clean_error(code, out + err, pattern, expected_code=2)


@pytest.mark.parametrize("args,pattern", [
    (["train", "--time-budget", "soon"], "cannot read time budget"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--preset", "tiny", "--lr", "-1", "--out", "x"], "learning rates must be positive"),
    (["generate", "/no/such/run", "hi"], "no such checkpoint"),
])
def test_bad_values(args, pattern, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert_clean_error(code, err, pattern)


def test_sampling_flag_validation(trained, capsys):
    code, _, err = run_cli(["generate", trained, "The", "--top-p", "1.5"], capsys)
    assert_clean_error(code, err, "top-p")
    code, _, err = run_cli(["generate", trained, "The", "--max-tokens", "0"], capsys)
    assert_clean_error(code, err, "max new tokens")


def test_resume_refuses_architecture_changes(trained, capsys):
    code, _, err = run_cli(["train", "--resume", "--out", trained, "--n-layer", "8"], capsys)
    assert_clean_error(code, err, "cannot change the model when resuming (n_layer)")


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", "--out", tmp_path / "nothing"], capsys)
    assert_clean_error(code, err, "no such checkpoint")


def test_parse_duration():
    assert parse_duration("90") == 90
    assert parse_duration("3m") == 180
    assert parse_duration("1.5h") == 5400
    with pytest.raises(LMForgeError):
        parse_duration("3 weeks")


def test_crash_while_saving_leaves_no_half_written_checkpoint(tmp_path, corpus_file, monkeypatch):
    """A failure in the middle of writing a checkpoint leaves the previous state untouched."""
    import lmforge.weights.checkpoint as ck

    api.train(tmp_path / "run", model="gpt", data=[str(corpus_file)], preset="tiny", show_progress=False,
              log=lambda *_: None, train_overrides=dict(TINY_TRAIN, steps=4))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    real = ck.save_file

    def exploding_save(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        if Path(path).name == "optimizer.safetensors":
            raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", exploding_save)
    with pytest.raises(OSError):
        api.train(tmp_path / "run", resume=True, show_progress=False, log=lambda *_: None,
                  train_overrides={"steps": 8})
    after = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert not any(name.startswith(".") for name in after), after
    assert api.LM.load(tmp_path / "run").checkpoint.step == 4
    assert [n for n in after if n.startswith("step_")] == [n for n in before if n.startswith("step_")]


def test_cpu_thread_count_follows_the_machine_or_the_environment(monkeypatch):
    import os

    import torch

    from lmforge.common import cpu_threads, set_cpu_threads
    from lmforge.errors import LMForgeError

    monkeypatch.delenv("LMFORGE_THREADS", raising=False)
    assert 1 <= cpu_threads() <= len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LMFORGE_THREADS", "1")
        assert set_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("LMFORGE_THREADS", "two")
        with pytest.raises(LMForgeError, match="whole number"):
            cpu_threads()
    finally:
        torch.set_num_threads(before)


def test_generate_with_a_specification(trained, tmp_path, capsys):
    code, out, _ = run_cli(["generate", trained, "x", "--choice", "on", "--choice", "off", "--seed", "0",
                            "--temperature", "1"], capsys)
    assert code == 0 and out.rstrip("\n")[1:] in ("on", "off"), out
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], '
                      '"additionalProperties": false}')
    code, out, _ = run_cli(["generate", trained, "", "--json-schema", schema, "--seed", "1", "--no-stream"], capsys)
    assert code == 0 and json.loads(out) in ({"a": 1}, {"a": 2}), out
    code, _, err = run_cli(["generate", trained, "", "--json-schema", schema, "--max-tokens", "2"], capsys)
    assert_clean_error(code, err, "before the specification was complete")


@pytest.mark.parametrize("args,pattern", [
    (["--json-schema", "{}", "--regex", "a"], "give one specification"),
    (["--grammar", "/no/such.lark"], "grammar file not found"),
    (["--json-schema", "/no/such.json"], "schema file not found"),
    (["--json-schema", '{"type": "object", "propertes": {}}'], "unknown JSON Schema keyword 'propertes' at #"),
    (["--regex", "(a"], "regex does not compile"),
])
def test_bad_specifications_on_the_command_line(trained, args, pattern, capsys):
    code, _, err = run_cli(["generate", trained, "x", *args], capsys)
    assert_clean_error(code, err, pattern)
