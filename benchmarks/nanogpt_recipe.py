"""nanoGPT's CPU recipe, lmforge beside nanoGPT in one run.

The recipe (nanoGPT README, shakespeare_char on CPU): 4 layers, 4 heads, 128 wide, context 64,
batch 12, 2000 iterations, lr 1e-3 decaying to 1e-4, 100 warmup steps, no dropout, beta2 0.99,
weight decay 0.1, clip 1.0, 20 eval batches every 250 iterations. lmforge's `nanogpt-cpu` preset
is that recipe; this script trains it on a character-level corpus (default: the Jargon File from
../shared/data/lm, 90/10 split) and, when given a nanoGPT checkout with --nanogpt, trains nanoGPT's
own train.py on the same characters and split right after, then prints one table of both.

    python benchmarks/nanogpt_recipe.py                                  # lmforge only
    python benchmarks/nanogpt_recipe.py --nanogpt ~/src/nanoGPT          # side by side
    python benchmarks/nanogpt_recipe.py --steps 500 --rounds 1           # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lm" / "jargon.txt"
BATCH, BLOCK = 12, 64


def run_lmforge(data: Path, steps: int, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from lmforge import api
    from lmforge.train.plot import read_metrics

    out = work / f"lmforge-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    res = api.train(out, model="gpt", tokenizer="char", data=[str(data)], preset="nanogpt-cpu",
                    show_progress=False, log=lambda *_: None, train_overrides={"steps": steps, "log_interval": 1})
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    evals = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}
    # per-step times (evaluation excluded), summarised like nanoGPT's: the median iteration
    ms = statistics.median(1000 * BATCH * BLOCK / r["tok_per_s"] for r in rows if r["kind"] == "train")
    return {"tok_s": BATCH * BLOCK / (ms / 1000), "ms_iter": ms, "wall_s": wall, "val": evals,
            "params": res.params, "mean_tok_s": res.tokens_per_s}


def prepare_nanogpt_data(text: str, dest: Path) -> None:
    """The same characters and 90/10 split in nanoGPT's on-disk format (uint16 ids + meta.pkl)."""
    dest.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    for name, part in (("train", text[:n]), ("val", text[n:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(dest / f"{name}.bin")
    with open(dest / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def run_nanogpt(repo: Path, text: str, steps: int, work: Path) -> dict:
    prepare_nanogpt_data(text, repo / "data" / "lmforge_bench")
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--dataset=lmforge_bench",
           "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={BLOCK}",
           f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={steps}",
           f"--lr_decay_iters={steps}", "--dropout=0.0", f"--out_dir={work / 'nanogpt'}", "--always_save_checkpoint=False"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    iters = [(int(m.group(1)), float(m.group(2))) for m in
             re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)]
    evals = {int(m.group(1)): float(m.group(2)) for m in
             re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout)}
    # iterations that also ran an evaluation are excluded from the per-iteration time
    times = [ms for it, ms in iters if it not in evals and it > 0]
    ms = statistics.median(times)
    return {"tok_s": BATCH * BLOCK / (ms / 1000), "ms_iter": ms, "wall_s": wall, "val": evals}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (train.py, model.py, config/)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side's fastest counts")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"corpus not found: {args.data} (this benchmark needs ../shared/data or --data FILE)")
    text = args.data.read_text(encoding="utf-8")
    torch_threads = os.environ.get("OMP_NUM_THREADS") or "default"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # alternate the two for --rounds rounds and keep each one's fastest round: this machine's
        # speed drifts by 10-15% over minutes, which would otherwise decide the ratio
        ours_runs, peer_runs = [], []
        for _ in range(args.rounds):
            ours_runs.append(run_lmforge(args.data, args.steps, work))
            if args.nanogpt:
                peer_runs.append(run_nanogpt(args.nanogpt.resolve(), text, args.steps, work))
        ours = min(ours_runs, key=lambda r: r["ms_iter"])
        peer = min(peer_runs, key=lambda r: r["ms_iter"]) if peer_runs else None

    print(f"\nnanoGPT CPU recipe on {args.data.name} ({len(text):,} chars, 90/10 split), {args.steps} steps, "
          f"{ours['params']:,} params, threads {torch_threads}, best of {args.rounds} alternating rounds")
    head = f"{'':28}{'lmforge':>12}{'nanoGPT':>12}{'ratio':>10}"
    print(head + "\n" + "-" * len(head))

    def row(name, a, b, fmt, better_high):
        if b is None:
            print(f"{name:28}{a:>12{fmt}}{'not run':>12}{'':>10}")
        else:
            ratio = a / b if better_high else b / a
            print(f"{name:28}{a:>12{fmt}}{b:>12{fmt}}{ratio:>9.2f}x")

    row("tokens/s (median step)", ours["tok_s"], peer and peer["tok_s"], ",.0f", True)
    row("ms per iteration (median)", ours["ms_iter"], peer and peer["ms_iter"], ".1f", False)
    row("wall time incl. evals (s)", ours["wall_s"], peer and peer["wall_s"], ".1f", False)
    for step in sorted(ours["val"]):
        if step % 500 == 0 or step == args.steps:
            b = peer["val"].get(step) if peer else None
            a = ours["val"][step]
            if b is None:
                print(f"{'val loss @ ' + str(step):28}{a:>12.4f}{'-' if peer else 'not run':>12}")
            else:
                print(f"{'val loss @ ' + str(step):28}{a:>12.4f}{b:>12.4f}{a - b:>+10.4f}")
    if not peer:
        print("\nnanoGPT not run: pass --nanogpt PATH_TO_CHECKOUT to train it in the same run.")
    if args.json:
        args.json.write_text(json.dumps({"lmforge": ours, "nanogpt": peer}, indent=2, default=str))


if __name__ == "__main__":
    main()
