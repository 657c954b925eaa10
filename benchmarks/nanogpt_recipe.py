"""nanoGPT's CPU recipe, lmforge beside nanoGPT in one run, over several seeds and corpora.

The recipe (nanoGPT README, shakespeare_char on CPU): 4 layers, 4 heads, 128 wide, context 64,
batch 12, 2000 iterations, lr 1e-3 decaying to 1e-4, 100 warmup steps, no dropout, beta2 0.99,
weight decay 0.1, clip 1.0, 20 eval batches every 250 iterations. lmforge's `nanogpt-cpu` preset
is that recipe. For every corpus (character level, first 90% train, last 10% validation) and
every seed, this script trains lmforge, then (with --nanogpt) nanoGPT's own train.py on the same
characters and split, and scores both final models on EVERY validation token with the same code
(non-overlapping 64-character windows). Both trainers' own 20-batch estimates are printed too:
one such estimate misses the split's mean by about 0.02 nats, which is as large as the
difference being measured, so the comparison rests on the full-split figure.

nanoGPT's train.py has no seed option (it seeds with 1337 + rank); each run goes through a shim
that adds the seed's offset to torch.manual_seed before running train.py unchanged.

    python benchmarks/nanogpt_recipe.py                                   # lmforge only, Jargon File
    python benchmarks/nanogpt_recipe.py --nanogpt ~/src/nanoGPT \\
        --data ../shared/data/lm/jargon.txt --data ../shared/data/lm/songci.txt --seeds 1337,1338,1339
    python benchmarks/nanogpt_recipe.py --steps 500 --seeds 1337          # quicker look
"""

from __future__ import annotations

import argparse
import json
import math
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

# runs nanoGPT's train.py unchanged, with torch.manual_seed shifted by the benchmark's seed
SHIM = """import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())  # the checkout: train.py imports its model.py
_seed = torch.manual_seed
torch.manual_seed = lambda s: _seed(s + {offset})
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def split_ids(text: str, stoi: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    n = int(len(text) * 0.9)
    return (np.array([stoi[c] for c in text[:n]], dtype=np.int64),
            np.array([stoi[c] for c in text[n:]], dtype=np.int64))


def full_val_loss(logits_of, val: np.ndarray) -> float:
    """Mean cross-entropy over every validation token after the first, in non-overlapping
    windows of BLOCK; `logits_of(x)` maps (B, T) ids to (B, T, V) logits."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    starts = list(range(0, len(val) - 1, BLOCK))
    with torch.no_grad():
        for i in range(0, len(starts), 64):
            group = starts[i:i + 64]
            for width in sorted({min(BLOCK, len(val) - 1 - s) for s in group}):
                rows = [s for s in group if min(BLOCK, len(val) - 1 - s) == width]
                x = torch.from_numpy(np.stack([val[s:s + width] for s in rows]))
                y = torch.from_numpy(np.stack([val[s + 1:s + 1 + width] for s in rows]))
                logits = logits_of(x)
                nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").item()
                count += y.numel()
    return nll / count


def run_lmforge(data: Path, text: str, steps: int, seed: int, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from lmforge import api
    from lmforge.train.plot import read_metrics

    out = work / f"lmforge-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    res = api.train(out, model="gpt", tokenizer="char", data=[str(data)], preset="nanogpt-cpu",
                    show_progress=False, log=lambda *_: None,
                    train_overrides={"steps": steps, "log_interval": 1, "seed": seed})
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    evals = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}
    # per-step times (evaluation excluded), summarised like nanoGPT's: the median iteration
    ms = statistics.median(1000 * BATCH * BLOCK / r["tok_per_s"] for r in rows if r["kind"] == "train")
    lm = api.LM.load(out, device="cpu", quantize="none")
    vocab = lm.tokenizer.tk.get_vocab()
    _, val = split_ids(text, {c: vocab.get(c, lm.tokenizer.unk_id) for c in set(text)})
    full = full_val_loss(lambda x: lm.model(x)[0], val)
    return {"tok_s": BATCH * BLOCK / (ms / 1000), "ms_iter": ms, "wall_s": wall, "val": evals, "full": full,
            "params": res.params}


def prepare_nanogpt_data(text: str, dest: Path) -> dict[str, int]:
    """The same characters and 90/10 split in nanoGPT's on-disk format (uint16 ids + meta.pkl)."""
    dest.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    for name, ids in zip(("train", "val"), split_ids(text, stoi)):
        ids.astype(np.uint16).tofile(dest / f"{name}.bin")
    with open(dest / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return stoi


def run_nanogpt(repo: Path, text: str, steps: int, seed: int, work: Path) -> dict:
    import torch

    stoi = prepare_nanogpt_data(text, repo / "data" / "lmforge_bench")
    out = work / f"nanogpt-{time.monotonic_ns()}"
    shim = work / "nanogpt_seed_shim.py"
    shim.write_text(SHIM.format(offset=seed - 1337), encoding="utf-8")
    # always_save_checkpoint: the checkpoint written at the last evaluation (iteration `steps`,
    # after `steps` updates) is the model scored below
    cmd = [sys.executable, str(shim), "config/train_shakespeare_char.py", "--dataset=lmforge_bench",
           "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={BLOCK}",
           f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={steps}",
           f"--lr_decay_iters={steps}", "--dropout=0.0", f"--out_dir={out}", "--always_save_checkpoint=True"]
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
    ms = statistics.median(ms for it, ms in iters if it not in evals and it > 0)
    sys.path.insert(0, str(repo))
    from model import GPT, GPTConfig  # nanoGPT's own model code, from the checkout

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu")
    if ckpt["iter_num"] != steps:
        raise SystemExit(f"nanoGPT's last checkpoint is from iteration {ckpt['iter_num']}, not {steps}")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    _, val = split_ids(text, stoi)
    full = full_val_loss(lambda x: model(x, x)[0], val)  # with targets given, nanoGPT returns every position
    return {"tok_s": BATCH * BLOCK / (ms / 1000), "ms_iter": ms, "wall_s": wall, "val": evals, "full": full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", help="a character corpus (repeatable; default: "
                    "the Jargon File)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="1337", help="comma-separated seeds, each a round of both trainers")
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (train.py, model.py, config/)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    corpora = args.data or [DEFAULT_DATA]
    for c in corpora:
        if not c.is_file():
            raise SystemExit(f"corpus not found: {c} (this benchmark needs ../shared/data or --data FILE)")
    seeds = [int(s) for s in args.seeds.split(",")]
    import torch

    threads = torch.get_num_threads()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for corpus in corpora:
            text = corpus.read_text(encoding="utf-8").replace("\r\n", "\n")
            for seed in seeds:  # the two alternate, so that the machine's drift hits both alike
                ours = run_lmforge(corpus, text, args.steps, seed, work)
                peer = run_nanogpt(args.nanogpt.resolve(), text, args.steps, seed, work) if args.nanogpt else None
                results[(corpus.name, seed)] = (ours, peer)
                print(f"{corpus.name} seed {seed}: lmforge {ours['full']:.4f} ({ours['tok_s']:,.0f} tok/s)"
                      + (f", nanoGPT {peer['full']:.4f} ({peer['tok_s']:,.0f} tok/s)" if peer else ""), flush=True)

    print(f"\nnanoGPT CPU recipe, {args.steps} steps, {next(iter(results.values()))[0]['params']:,} params, "
          f"{threads} threads; validation loss over every token of the held-out 10%")
    head = (f"{'corpus':14}{'seed':>6}{'lmforge':>10}{'nanoGPT':>10}{'diff':>9}{'lmf est':>10}{'nGPT est':>10}"
            f"{'lmf tok/s':>11}{'nGPT tok/s':>11}{'speed':>7}")
    print(head + "\n" + "-" * len(head))
    for (name, seed), (a, b) in results.items():
        est_a = a["val"].get(args.steps, math.nan)
        if b is None:
            print(f"{name:14}{seed:>6}{a['full']:>10.4f}{'-':>10}{'':>9}{est_a:>10.4f}{'-':>10}{a['tok_s']:>11,.0f}")
            continue
        print(f"{name:14}{seed:>6}{a['full']:>10.4f}{b['full']:>10.4f}{a['full'] - b['full']:>+9.4f}{est_a:>10.4f}"
              f"{b['val'].get(args.steps, math.nan):>10.4f}{a['tok_s']:>11,.0f}{b['tok_s']:>11,.0f}"
              f"{a['tok_s'] / b['tok_s']:>6.2f}x")
    for name in dict.fromkeys(n for n, _ in results):
        runs = [v for (n, _), v in results.items() if n == name]
        mean_a = statistics.mean(a["full"] for a, _ in runs)
        if runs[0][1] is None:
            print(f"{name:14}{'mean':>6}{mean_a:>10.4f}")
            continue
        mean_b = statistics.mean(b["full"] for _, b in runs)
        speed = statistics.mean(a["tok_s"] / b["tok_s"] for a, b in runs)
        print(f"{name:14}{'mean':>6}{mean_a:>10.4f}{mean_b:>10.4f}{mean_a - mean_b:>+9.4f}{'':>20}{'':>22}{speed:>6.2f}x")
    if not args.nanogpt:
        print("\nnanoGPT not run: pass --nanogpt PATH_TO_CHECKOUT to train it in the same run.")
    if args.json:
        args.json.write_text(json.dumps({f"{n}/{s}": {"lmforge": a, "nanogpt": b}
                                         for (n, s), (a, b) in results.items()}, indent=2, default=str))


if __name__ == "__main__":
    main()
