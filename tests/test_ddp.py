"""Two CPU processes under torchrun (gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from lmforge import api



def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, corpus_file):
    steps = 8
    common = ["--model", "gpt", "--preset", "tiny", "--data", str(corpus_file), "--steps", str(steps),
              "--grad-accum", "2", "--batch-size", "4", "--eval-interval", "4", "--log-interval", "1", "--sample-tokens", "0", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lmforge", "train", "--out", str(tmp_path / "ddp"), *common],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout

    over = {"steps": steps, "grad_accum": 2, "batch_size": 4, "eval_interval": 4, "log_interval": 1}
    single = api.train(tmp_path / "single", model="gpt", data=[str(corpus_file)], preset="tiny",
                       show_progress=False, log=lambda *_: None, train_overrides=over)
    ddp_losses = _losses(tmp_path / "ddp")
    single_losses = _losses(tmp_path / "single")
    assert [s for s, _ in ddp_losses] == [s for s, _ in single_losses]
    for (_, a), (_, b) in zip(ddp_losses, single_losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert ddp_losses[-1][1] < ddp_losses[0][1]
    # weights end up the same too: compare the final validation losses (sampled, and over every token)
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ddp_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert ddp_eval["val_loss"] == pytest.approx(single.final_eval["val_loss"], rel=1e-4)
    assert rows[-1]["kind"] == "final"
    assert rows[-1]["val_all_loss"] == pytest.approx(single.final_eval["val_all_loss"], rel=1e-4)
