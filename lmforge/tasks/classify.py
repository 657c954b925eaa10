"""Text classification as one call each: fine-tune a head on labelled rows, label texts with a
fine-tuned (or zero-shot) classifier, score a labelled file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LMForgeError


TUNE_DEFAULTS = {"lr": 2e-5, "batch_size": 16}
"""Tuning a decoder's layers (--tune) starts from a fitted head and pretrained layers 10x the
size of MiniLM: a smaller rate and smaller batches than fine-tuning an encoder (on SST-2,
2 epochs at these took the accuracy over 1,311 held-out sentences from 0.905 to 0.908-0.916
in three runs)."""


def make_config(**options):
    """The fine-tuning settings (train.classify.ClassifyConfig); lr and batch_size given as
    None take the defaults of what is trained (TUNE_DEFAULTS with tune)."""
    from lmforge.train.classify import ClassifyConfig

    defaults = TUNE_DEFAULTS if options.get("tune") else {}
    for k in ("lr", "batch_size"):
        if options.get(k, 0) is None:
            options.pop(k)
            if k in defaults:
                options[k] = defaults[k]
    return ClassifyConfig(**options)


def finetune(model: str, train: Path, out: Path, cfg, text_col: str = "text", label_col: str = "label",
             val: Path | None = None, resume: bool = False, pooling: str | None = None, device: str = "auto",
             log=print, prompt: str | None = None, layers: list[int] | None = None) -> dict:
    """Fine-tune a classifier on `model` (an encoder or an lmforge run), or train a linear head on
    a pretrained decoder's frozen features (a GGUF or Hugging Face decoder, e.g. gemma3-270m,
    its text wrapped in `prompt`, features from `layers`); returns the report."""
    from lmforge.encoders import DEFAULT_TEMPLATE, DecoderFeatures, is_pretrained_decoder, load_backbone
    from lmforge.train.classify import finetune as run
    from lmforge.train.classify import fit_probe

    if is_pretrained_decoder(model):
        if resume:
            raise LMForgeError("a head on a frozen decoder has nothing to resume: run it again without --resume")
        if cfg.lora_rank or pooling is not None:
            raise LMForgeError("--lora and --pooling apply to fine-tuning; a pretrained decoder stays frozen "
                               "(its features are pooled both ways)")
        if cfg.tune and cfg.time_budget is not None:
            raise LMForgeError("--time-budget applies to fine-tuning an encoder; --tune runs its --epochs")
        feats = DecoderFeatures(model, device, layers, prompt or DEFAULT_TEMPLATE, cfg.max_len,
                                quantize="none" if cfg.tune else "auto")  # tuning trains float weights
        return fit_probe(feats, train, text_col, label_col, out, cfg, val_path=val, log=log)
    if prompt is not None or layers is not None or cfg.tune:
        raise LMForgeError("--prompt, --layers and --tune apply to a pretrained decoder's features "
                           "(e.g. --model gemma3-270m); an encoder is always fine-tuned")
    enc = load_backbone(model, device=device, pooling=pooling)
    return run(enc, train, text_col, label_col, out, cfg, val_path=val, resume=resume, log=log)


def load(model: str | Path, zero_shot: str | None = None, device: str = "auto", labels: str | None = None):
    """A folder made by `finetune`; with zero_shot ("pos=...,neg=..." or "pos,neg") an
    encoder whose closest label description wins; with labels ("pos,neg") a decoder that
    writes one of the labels (a choice constraint), each label's probability its own."""
    if labels is not None:
        if zero_shot is not None:
            raise LMForgeError("give --labels (a decoder) or --zero-shot (an encoder), not both")
        from lmforge.api import LM
        from lmforge.tasks.structured import LLMClassifier

        return LLMClassifier(LM.load(str(model), device=device), labels.split(","))
    if zero_shot is not None:
        from lmforge.encoders import ZeroShotClassifier

        return ZeroShotClassifier.from_spec(str(model), zero_shot, device)
    from lmforge.train.classify import TextClassifier

    return TextClassifier.load(Path(model), device=device)


@dataclass
class Labelled:
    texts: list[str]
    predictions: list[dict]
    """Per text: {"label": ..., "probs": {label: probability}}."""


def label(model: str | Path, texts: list[str] | None = None, input: Path | None = None, zero_shot: str | None = None,
          device: str = "auto", labels: str | None = None) -> Labelled:
    """Label the given texts, or every non-blank line of `input`."""
    from lmforge.common import read_lines

    if (texts is None) == (input is None):
        raise LMForgeError("give texts or an input file, not both")
    texts = read_lines(input, skip_blank=True) if input is not None else list(texts)
    if not texts or not all(t.strip() for t in texts):
        raise LMForgeError("nothing to classify: the text is empty")
    clf = load(model, zero_shot, device, labels)
    return Labelled(texts, clf.predict(texts))


def evaluate(model: str | Path, path: Path, text_col: str = "text", label_col: str = "label",
             zero_shot: str | None = None, device: str = "auto", labels: str | None = None):
    """Accuracy, macro-F1 and the per-class table over a labelled .csv/.tsv/.jsonl file:
    (scores, labels, rows)."""
    from lmforge.train.classify import read_rows

    texts, gold = read_rows(path, text_col, label_col)
    clf = load(model, zero_shot, device, labels)
    return clf.evaluate(texts, gold), clf.labels, len(texts)
