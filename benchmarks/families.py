"""The four model families at matched size (~1M non-embedding parameters, preset `small`) and a
matched wall-clock budget, char- and BPE-level: training tokens/s and validation bits per byte.

The corpus (default: the Jargon File from ../shared/data/lm) is cut 90/10 at a line boundary;
every model trains on the first part for the same number of seconds (its LR schedule follows
the clock) and is scored on every token of the held-out part, so bits per byte are comparable
across tokenizers. The GRU and LSTM run on PyTorch's fused nn.GRU / nn.LSTM kernels.

    python benchmarks/families.py                      # 3 minutes per model, 8 models
    python benchmarks/families.py --budget 60 --families gpt lstm --tokenizers char
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lm" / "jargon.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per model")
    ap.add_argument("--families", nargs="+", default=["rnn", "gru", "lstm", "gpt"])
    ap.add_argument("--tokenizers", nargs="+", default=["char", "bpe"])
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"corpus not found: {args.data} (this benchmark needs ../shared/data or --data FILE)")

    from lmforge import api
    from lmforge.models import count_params

    text = args.data.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
        # a char model cannot score characters it never saw: drop those few from the held-out text
        seen = set(text[:cut])
        (tmp / "val.txt").write_text("".join(c for c in text[cut:] if c in seen), encoding="utf-8")
        for tok in args.tokenizers:
            for fam in args.families:
                out = tmp / f"{fam}-{tok}"
                t0 = time.perf_counter()
                res = api.train(out, model=fam, tokenizer=tok, data=[str(tmp / "train.txt")], preset="small",
                                vocab_size=args.vocab_size, show_progress=False, log=lambda *_: None,
                                train_overrides={"steps": 1_000_000, "time_budget": args.budget,
                                                 "eval_interval": 1_000_000})
                lm = api.LM.load(out)
                ev = lm.evaluate([tmp / "val.txt"], batch_size=32)
                row = {"family": fam, "tokenizer": tok, "params": res.params,
                       "params_no_emb": count_params(lm.model, exclude_embeddings=True), "steps": res.step,
                       "tok_s": res.tokens_per_s, "val_bpb": ev.bpb, "val_loss": ev.loss,
                       "wall_s": time.perf_counter() - t0}
                rows.append(row)
                print(f"{fam:5} {tok:4} steps {res.step:6d}  {res.tokens_per_s:9,.0f} tok/s  bpb {ev.bpb:.4f}",
                      flush=True)

    print(f"\nFour families, preset small, {args.budget:.0f}s of training each, on {args.data.name} "
          f"(held-out 10% scored in full)")
    head = f"{'family':8}{'tokenizer':>10}{'params':>11}{'non-emb':>10}{'steps':>8}{'tokens/s':>11}{'val bpb':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['family']:8}{r['tokenizer']:>10}{r['params']:>11,}{r['params_no_emb']:>10,}{r['steps']:>8,}"
              f"{r['tok_s']:>11,.0f}{r['val_bpb']:>9.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
