"""Classification on real data (needs ../shared/data/classify): all-MiniLM-L6-v2 fine-tuned, or a
linear head on Gemma 3 270M's frozen middle layers.

    lmforge pull minilm-l6 && lmforge pull gemma3-270m
    python benchmarks/classify.py --task sst2            # SST-2: whole sentences held out as a test set
    python benchmarks/classify.py --task sst2 --model gemma3-270m \
        --prompt 'Review: {text}\nSentiment (positive or negative):'   # the frozen decoder
    python benchmarks/classify.py --task sst2 --model gemma3-270m --tune \
        --prompt 'Review: {text}\nSentiment (positive or negative):'   # and its feature layers tuned
    python benchmarks/classify.py --task sst2 --dev PATH # also score an SST-2 dev TSV kept aside
    python benchmarks/classify.py --task chnsenticorp    # Chinese hotel reviews, 20% held out

SST-2's training file is mostly phrases cut from its 6,885 sentences. The test set here is 12%
of the whole sentences (stratified), and every row that is a phrase of a test sentence is
removed before training, so nothing of a test sentence is trained on; `lmforge finetune
classify` then holds out its own validation sentences the same way (for keeping the best
checkpoint), so the test sentences are never used to choose anything. Run folders go to
runs/bench-*; the settings are printed.
"""

from __future__ import annotations

import argparse
import ast
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "classify"

TASKS = {
    # file, text column, label column, test share (whole texts; 0: the validation split only),
    # fine-tuning settings, settings for a head on a frozen decoder
    "sst2": (DATA / "sst2_train.tsv", "sentence", "label", 0.12,
             dict(val_fraction=0.08, epochs=3, max_len=64, lr=1e-4, eval_every=500, patience=6),
             dict(val_fraction=0.08, max_len=128, drop_phrases=True)),
    "chnsenticorp": (DATA / "chnsenticorp_htl.csv", "review", "label", 0.0,
                     dict(val_fraction=0.2, epochs=3, max_len=128, eval_every=200, class_weights=True,
                          skip_empty=True),
                     dict(val_fraction=0.2, max_len=256, skip_empty=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--dev", type=Path, help="SST-2 dev TSV (sentence<TAB>label) to score after training")
    ap.add_argument("--model", default="minilm-l6", help="an encoder to fine-tune, or a pretrained decoder to use frozen")
    ap.add_argument("--prompt", help="the decoder's prompt template, with {text} (\\n for a newline)")
    ap.add_argument("--layers", help="the decoder's feature layers, comma-separated (default: its middle third)")
    ap.add_argument("--tune", action="store_true", help="a decoder: also train its feature layers (lmforge's --tune)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a fine-tuning setting (e.g. --set epochs=2 --set lr=5e-5)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from lmforge.cli._common import unescape
    from lmforge.encoders import is_pretrained_decoder
    from lmforge.tasks.classify import TUNE_DEFAULTS, finetune
    from lmforge.train.classify import ClassifyConfig, TextClassifier, read_rows
    from lmforge.train.holdout import whole_text_split

    frozen = is_pretrained_decoder(args.model)
    prompt = unescape(args.prompt)
    layers = [int(v) for v in args.layers.split(",")] if args.layers else None

    for task in TASKS if args.task == "all" else [args.task]:
        path, text_col, label_col, test_fraction, tune_settings, probe_settings = TASKS[task]
        settings = dict(probe_settings if frozen else tune_settings)
        if frozen and args.tune:
            settings.update(tune=True, epochs=2, **TUNE_DEFAULTS)
        if not path.is_file():
            print(f"{task}: {path} not found (../shared/data is needed); skipped")
            continue
        for kv in args.set:
            k, v = kv.split("=", 1)
            settings[k] = ast.literal_eval(v)
        out = ROOT / "runs" / (f"bench-classify-{task}" + ("" if args.model == "minilm-l6" else f"-{Path(args.model).name}")
                             + ("-tuned" if frozen and args.tune else ""))
        shutil.rmtree(out, ignore_errors=True)
        cfg = ClassifyConfig(**settings)
        print(f"\n{task}: {args.model}{' (frozen)' if frozen else ''}, {cfg}" + (f", prompt {prompt!r}" if prompt else ""))
        with tempfile.TemporaryDirectory() as tmp:
            train_path, test = path, None
            if test_fraction:
                texts, labels = read_rows(path, text_col, label_col, cfg.skip_empty)
                split = whole_text_split(texts, labels, test_fraction, random.Random(2024))
                test = ([texts[i] for i in split.val], [labels[i] for i in split.val])
                train_path = Path(tmp) / path.name
                with open(train_path, "w", encoding="utf-8") as f:
                    f.write(f"{text_col}\t{label_col}\n")
                    f.writelines(f"{texts[i]}\t{labels[i]}\n" for i in split.train)
                print(f"{task}: {len(texts):,} rows, {split.whole:,} whole texts; test: {len(split.val):,} whole "
                      f"texts; {split.dropped:,} rows that are phrases of them removed; {len(split.train):,} left")
            t = time.perf_counter()
            report = finetune(args.model, train_path, out, cfg, text_col, label_col, device="cpu", prompt=prompt,
                              layers=layers)
            minutes = (time.perf_counter() - t) / 60
        print(f"{task}: validation accuracy {report['val_accuracy']:.4f} on {report['val_rows']:,} held-out texts "
              + ("(reported only: nothing is chosen on it); " if frozen else "(used to keep the best checkpoint); ")
              + f"{report['train_rows']:,} training rows, {report['steps']} steps, "
              f"{minutes:.1f} min on 2 threads")
        clf = TextClassifier.load(out, device="cpu")
        if test is not None:
            s = clf.evaluate(*test)
            print(f"{task}: TEST accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f} on {len(test[0]):,} whole "
                  f"sentences never trained on nor used for selection")
            print(s.table(clf.labels))
        else:
            print((out / "confusion.txt").read_text())
        if task == "sst2" and args.dev is not None:
            texts, labels = read_rows(args.dev, "sentence", "label")
            s = clf.evaluate(texts, labels)
            print(f"sst2 dev ({args.dev}): accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f} on {len(texts)} rows")


if __name__ == "__main__":
    main()
