"""Classification fine-tuning of all-MiniLM-L6-v2 on real data (needs ../shared/data/classify).

    lmforge pull minilm-l6
    python benchmarks/classify.py --task sst2            # SST-2 train file; held-out rows of it
    python benchmarks/classify.py --task sst2 --dev PATH # also score an SST-2 dev TSV kept aside
    python benchmarks/classify.py --task chnsenticorp    # Chinese hotel reviews, 20% held out

Same as `lmforge finetune classify` with the settings printed; run folders go to runs/bench-*.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "classify"

TASKS = {
    # file, text column, label column, held-out share, settings
    "sst2": (DATA / "sst2_train.tsv", "sentence", "label", 0.03,
             dict(max_train=20_000, epochs=2, max_len=64, eval_every=250)),
    "chnsenticorp": (DATA / "chnsenticorp_htl.csv", "review", "label", 0.2,
                     dict(epochs=3, max_len=128, eval_every=200, class_weights=True, skip_empty=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--dev", type=Path, help="SST-2 dev TSV (sentence<TAB>label) to score after training")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from lmforge.encoders import Encoder
    from lmforge.train.classify import ClassifyConfig, TextClassifier, finetune, read_rows

    for task in TASKS if args.task == "all" else [args.task]:
        path, text_col, label_col, val_fraction, settings = TASKS[task]
        if not path.is_file():
            print(f"{task}: {path} not found (../shared/data is needed); skipped")
            continue
        out = ROOT / "runs" / f"bench-classify-{task}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ClassifyConfig(val_fraction=val_fraction, **settings)
        print(f"\n{task}: minilm-l6, {cfg}")
        t = time.perf_counter()
        report = finetune(Encoder.load("minilm-l6", device="cpu"), path, text_col, label_col, out, cfg)
        minutes = (time.perf_counter() - t) / 60
        print(f"{task}: held-out accuracy {report['val_accuracy']:.4f}, macro-F1 {report['val_macro_f1']:.4f} "
              f"on {report['val_rows']:,} rows; {report['train_rows']:,} training rows, {report['steps']} steps, "
              f"{minutes:.1f} min on 2 threads")
        print((out / "confusion.txt").read_text())
        if task == "sst2" and args.dev is not None:
            texts, labels = read_rows(args.dev, "sentence", "label")
            s = TextClassifier.load(out, device="cpu").evaluate(texts, labels)
            print(f"sst2 dev ({args.dev}): accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f} on {len(texts)} rows")


if __name__ == "__main__":
    main()
