"""Images as prompts on easy-VQA: lmforge's vision run beside a text-only baseline and a classifier
baseline, in one run (needs `pip install easy-vqa` and `lmforge pull smollm2-135m-instruct`).

    python benchmarks/vision.py                          # train 19 min (+ the last validation: under 20), score 2,000
    python benchmarks/vision.py --limit 0                # score all 9,673 test questions
    python benchmarks/vision.py --run runs/see           # score an existing run, no training

1. vision run (kept in runs/bench-vision): `lmforge finetune vision` on easy-VQA's training split for --budget (the decoder,
   SmolLM2-135M-Instruct, frozen but for rank-8 adapters), then greedy answers to the test split's questions, exact
   match.
2. text only: the same decoder, the same questions, no image, its reply held to the 13 answers
   by a choice constraint (what the question and the model's priors alone give).
3. classifier: a CNN of the same shape as the vision encoder, its pooled features beside a bag of
   the question's words, a linear layer over the 13 answers; trained here on the same split
   (easy-VQA's own reference model is of this kind).
Also: time to first token for an image question after load, against a text prompt of the same
length in positions, on this CPU's kernel path and (on an AVX-512 host) on the AVX2 path in a
second process, with PyTorch, oneDNN and lmforge's kernels all held to AVX2:

    LMFORGE_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/vision.py --run runs/bench-vision --ttft-only
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def classifier_baseline(train, test_rows, test, seconds: float, seed: int = 0) -> dict:
    from lmforge.config import VisionConfig
    from lmforge.models.vision import ImageEncoder, VisionTower

    torch.manual_seed(seed)
    answers = sorted({r[2] for r in train.rows if r[3] != "caption"})
    vocab = sorted({w for r in train.rows for w in r[1].rstrip("?").split()})
    widx, aidx = {w: i for i, w in enumerate(vocab)}, {a: i for i, a in enumerate(answers)}
    cfg = VisionConfig()
    norm = VisionTower(cfg).normalize  # the same preprocessing as the vision run

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = ImageEncoder(cfg)
            self.q = nn.Linear(len(vocab), 128)
            self.out = nn.Sequential(nn.Linear(cfg.channels[-1] + 128, 256), nn.GELU(), nn.Linear(256, len(answers)))

        def forward(self, px, bow):
            f = self.enc(norm(px)).mean((2, 3))  # (B, C) pooled image features
            return self.out(torch.cat([f, F.gelu(self.q(bow))], 1))

    def bow(qs):
        x = torch.zeros(len(qs), len(vocab))
        for i, q in enumerate(qs):
            for w in q.rstrip("?").split():
                if w in widx:
                    x[i, widx[w]] = 1
        return x

    rows = [r for r in train.rows if r[3] != "caption"]
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    t0, step, rng = time.perf_counter(), 0, random.Random(seed)
    while time.perf_counter() - t0 < seconds:
        b = [rows[rng.randrange(len(rows))] for _ in range(64)]
        logits = net(train.images[[r[0] for r in b]], bow([r[1] for r in b]))
        loss = F.cross_entropy(logits, torch.tensor([aidx[r[2]] for r in b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    net.eval()
    hits, total = Counter(), Counter()
    with torch.no_grad():
        for s in range(0, len(test_rows), 256):
            part = test_rows[s:s + 256]
            pred = net(test.images[[r[0] for r in part]], bow([r[1] for r in part])).argmax(1)
            for r, p in zip(part, pred.tolist()):
                for k in (r[3], "all"):
                    total[k] += 1
                    hits[k] += answers[p] == r[2]
    return {"acc": {k: hits[k] / total[k] for k in total}, "steps": step, "seconds": time.perf_counter() - t0}


def text_only(lm, rows, answers) -> dict:
    """The decoder alone, made to reply with one of the answers (a choice constraint): what the
    question's words and the model's priors give without the image."""
    hits, total = Counter(), Counter()
    stops = lm.tokenizer.stop_ids
    spec = lm.spec(choices=answers)
    for s in range(0, len(rows), 64):
        part = rows[s:s + 64]
        reqs = [lm.request(lm.chat_ids([{"role": "user", "content": q}]), 8, temperature=0.0, spec=spec)
                for _, q, _, _ in part]
        out: dict[int, list[int]] = {}
        for ev in lm.engine.run(reqs):
            if ev.token is not None and ev.token not in stops:
                out.setdefault(ev.request_id, []).append(ev.token)
        for r, req in zip(part, reqs):
            ok = lm.tokenizer.decode(out.get(req.id, [])).strip().lower().rstrip(".") == r[2]
            for k in (r[3], "all"):
                total[k] += 1
                hits[k] += ok
    return {k: hits[k] / total[k] for k in total}


def ttft(lm, image, n: int = 21) -> tuple[float, float, int, float]:
    """Median time to the first event for an image question, and for the same prompt with the
    image's positions filled by text tokens instead, the two alternated (this host's speed
    drifts); in both the text before the image is cached (LM.load computes it for a vision run),
    the rest is computed. Also the time of the very first image question of a freshly loaded
    model (lm must be just loaded)."""
    from lmforge.images import question_ids
    from lmforge.models.vision import IMAGE

    ids = question_ids(lm.tokenizer, "what color is the shape?", lm.vision_chat)
    k, rows = ids.index(IMAGE), lm.vision.config.n_tokens + 2
    filler = lm.tokenizer.encode(" a small red circle on a pale ground" * 4, check=False)[:rows - 1]
    trial = iter(range(10 ** 6))

    def text_ids():  # a different first token in the image's place each time: nothing past the prefix is reused
        return ids[:k] + [1000 + next(trial)] + filler + ids[k + 1:]

    def first(make):
        t = time.perf_counter()
        next(iter(lm.engine.run([make()])))
        return time.perf_counter() - t

    def image_question():
        return first(lambda: lm.request(ids, 1, temperature=0.0, images=[image]))

    def text_prompt():
        return first(lambda: lm.request(text_ids(), 1, temperature=0.0))

    cold = image_question()  # the first question after load
    for _ in range(3):  # warm-up: the kernels, and the prefix in a slot
        image_question(), text_prompt()
    pairs = [(image_question(), text_prompt()) for _ in range(n)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs), len(ids) - 1 + rows, cold


def ttft_line(run: Path, image, label: str) -> str:
    from lmforge.api import LM

    img_s, txt_s, positions, cold_s = ttft(LM.load(run), image)
    return (f"time to first token after load, {label} ({positions} positions, the text before the image cached): "
            f"image question {1000 * img_s:.1f} ms, the same prompt with text in the image's place {1000 * txt_s:.1f} "
            f"ms ({img_s / txt_s:.2f}x); the first image question after load {1000 * cold_s:.1f} ms")


def kernel_path() -> str:
    from lmforge.models import kernels

    return f"lmforge kernels {kernels.chosen_variant()}, PyTorch {torch.backends.cpu.get_cpu_capability()}"


AVX2_ENV = {"LMFORGE_KERNELS": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="smollm2-135m-instruct")
    ap.add_argument("--budget", default="19m", help="training time of the vision run, its warm-up included (the classifier gets 1/4)")
    ap.add_argument("--run", type=Path, help="score this vision run instead of training one")
    ap.add_argument("--limit", type=int, default=2000, help="test questions scored (a fixed sample; 0 = all)")
    ap.add_argument("--ttft-only", action="store_true", help="with --run: time to first token only, on this process's "
                    "kernel path")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.ttft_only:
        if args.run is None:
            ap.error("--ttft-only needs --run")
        from lmforge.vqa import load_data

        print(ttft_line(args.run, load_data(None, "test", 64).images[0], kernel_path()))
        return
    from lmforge.api import LM
    from lmforge.cli._common import parse_duration
    from lmforge.tasks import vision
    from lmforge.vqa import load_data, vqa_accuracy

    budget = parse_duration(args.budget)
    test = load_data(None, "test", 64)
    rows = test.qa()
    if args.limit and args.limit < len(rows):
        rows = random.Random(0).sample(rows, args.limit)
    run, t_train = args.run, None
    if run is None:
        run = ROOT / "runs" / "bench-vision"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        t = time.perf_counter()
        rep = vision.finetune(args.lm, run, time_budget=budget, steps=100_000, log=print, progress=False)
        t_train = time.perf_counter() - t
        print(f"trained in {t_train / 60:.1f} min: {rep['steps']} steps, validation accuracy {rep['val_accuracy']:.4f}")
    lm = LM.load(run)
    t = time.perf_counter()
    ours = vqa_accuracy(lm.engine, lm.vision, lm.tokenizer, lm.vision_chat, test.images, rows)
    t_eval = time.perf_counter() - t
    base = text_only(lm, rows, sorted({r[2] for r in rows}))
    clf = classifier_baseline(load_data(None, "train", 64), rows, test, budget / 4)
    timings = [ttft_line(run, test.images[0], kernel_path())]
    from lmforge.models import kernels

    if kernels.chosen_variant() == "avx512" and kernels.runnable("avx2"):  # the AVX2 path too, in its own process
        import os
        import subprocess

        out = subprocess.run([sys.executable, __file__, "--run", str(run), "--ttft-only"], capture_output=True,
                             text=True, env={**os.environ, **AVX2_ENV})
        timings.append(out.stdout.strip() or f"AVX2 path: failed ({out.stderr.strip()[-300:]})")

    kinds = ["all", "yes/no", "shape", "color"]
    print(f"\neasy-VQA test split: {len(rows):,} questions on {len({r[0] for r in rows})} images; decoder {args.lm}; "
          f"{torch.get_num_threads()} threads")
    head = f"{'':34}" + "".join(f"{k:>10}" for k in kinds)
    print(head + "\n" + "-" * len(head))
    print(f"{'lmforge vision run':34}" + "".join(f"{ours.get(k, 0):>10.4f}" for k in kinds))
    print(f"{'text only (no image)':34}" + "".join(f"{base.get(k, 0):>10.4f}" for k in kinds))
    print(f"{'classifier (CNN + words, 13-way)':34}" + "".join(f"{clf['acc'].get(k, 0):>10.4f}" for k in kinds))
    if t_train is not None:
        print(f"\nvision run trained in {t_train / 60:.1f} min; scoring took {t_eval:.0f} s; "
              f"classifier trained {clf['seconds']:.0f} s ({clf['steps']} steps)")
    print("\n".join(timings))


if __name__ == "__main__":
    main()
