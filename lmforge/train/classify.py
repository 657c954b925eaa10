"""Text classification: a linear head on a pretrained encoder's pooled output, fine-tuned on the
user's labelled rows (CSV, TSV or JSONL), evaluated honestly on rows it never trained on.

A run folder holds the best model by validation accuracy (encoder + head as safetensors, with a
readable classifier.json naming the labels and the encoder's config), metrics.jsonl, and the
validation confusion matrix as text and PNG.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import atomic_dir, seed_everything
from lmforge.config import EncoderConfig
from lmforge.errors import LMForgeError
from lmforge.models.bert import POOLING, BertEncoder
from lmforge.train.holdout import whole_text_split, whole_texts
from lmforge.train.loop import Task, _progress, append_metrics, fit


# ---------------------------------------------------------------- data
def read_rows(path: Path, text_col: str, label_col: str, skip_empty: bool = False) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) from a .csv, .tsv or .jsonl file; every problem is one clear
    error (rows with an empty text or label are dropped instead when skip_empty is set)."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"no such file: {path}")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LMForgeError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise LMForgeError(f"{path}:{n}: not a JSON object (a {type(row).__name__})")
                rows.append(row)
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(raw), delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t"
                                else csv.QUOTE_MINIMAL)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    for col in (text_col, label_col):
        if col not in columns:
            raise LMForgeError(f"{path}: no column {col!r} (columns: {', '.join(sorted(map(str, columns))) or 'none'})")
    texts, labels = [], []
    for n, r in enumerate(rows, 2):
        text, label = r.get(text_col), r.get(label_col)
        empty_text, empty_label = text is None or not str(text).strip(), label is None or str(label).strip() == ""
        if (empty_text or empty_label) and skip_empty:
            continue
        if empty_text:
            raise LMForgeError(f"{path}: row {n} has an empty {text_col!r} (--skip-empty drops such rows)")
        if empty_label:
            raise LMForgeError(f"{path}: row {n} has no {label_col!r} (--skip-empty drops such rows)")
        texts.append(str(text).strip())
        labels.append(str(label).strip())
    if not texts:
        raise LMForgeError(f"{path} has no rows")
    return texts, labels


# ---------------------------------------------------------------- model
class Classifier(nn.Module):
    """A head on a backbone's pooled states. The backbone is a BertEncoder or one of lmforge's
    own language models (GPT, RNN/GRU/LSTM), whose final states it reads instead of its logits."""

    def __init__(self, encoder: nn.Module, n_classes: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.causal = not isinstance(encoder, BertEncoder)
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # right padding: a causal model's real tokens never see the pads after them
        hidden = self.encoder(idx, return_hidden=True)[0] if self.causal else self.encoder(idx, mask)  # (B, T, C)
        pooled = POOLING[self.pooling](hidden, mask)  # (B, C)
        return self.head(self.drop(pooled))  # (B, n_classes) logits


@dataclass
class ClassifyConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    """The new head starts from scratch and learns faster than the pretrained encoder."""
    weight_decay: float = 0.01
    warmup_frac: float = 0.06
    max_len: int = 64
    val_fraction: float = 0.1
    eval_every: int = 200
    """Optimizer steps between validations (and at every epoch's end)."""
    patience: int = 4
    """Stop after this many validations without a better accuracy."""
    class_weights: bool = False
    """Weight the loss by inverse class frequency (for imbalanced labels)."""
    max_train: int | None = None
    """Use at most this many training rows (a random subsample)."""
    drop_phrases: bool = False
    """Train on whole texts only: leave out rows that are word spans of a longer row (the
    phrase rows of SST-2-style data, which a frozen backbone's linear head gains little from
    while each costs a forward pass)."""
    seed: int = 1337
    lora_rank: int = 0
    """With a rank > 0, the encoder stays frozen and only low-rank adapters on its attention
    projections (and the head) train; the adapters are merged into the saved weights."""
    skip_empty: bool = False
    """Drop rows whose text or label is empty instead of stopping with an error."""
    tune: bool = False
    """A pretrained decoder: after the linear heads are fitted on its frozen features, train its
    layers from the first feature layer up together with their averaged head (epochs, lr,
    batch_size, weight_decay and warmup_frac apply; the head learns at 10 x lr)."""
    time_budget: float | None = None
    """Seconds of training: the schedule follows the clock and training stops when it runs out."""
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr", "weight_decay", "warmup_frac"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name.endswith("lr") and v == 0):
                raise LMForgeError(f"{name.replace('_', '-')} must be a finite positive number, got {v}")


def scored(probs: np.ndarray, y: list[int]) -> tuple["Scores", float]:
    """Scores and mean negative log-likelihood of class probabilities (N, K) against labels y."""
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return score(y, probs.argmax(1).tolist(), probs.shape[1]), nll


def batches(ids: list[list[int]], order: list[int], batch_size: int, pad: int):
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        m = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            m[r, :len(ids[i])] = 1
        yield rows, x, m


@torch.inference_mode()
def predict_proba(model: Classifier, ids: list[list[int]], pad: int, batch_size: int = 64) -> np.ndarray:
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), model.head.out_features), dtype=np.float32)
    dev = model.head.weight.device
    for rows, x, m in batches(ids, order, batch_size, pad):
        out[rows] = F.softmax(model(x.to(dev), m.to(dev)).float(), -1).cpu().numpy()
    return out


@dataclass
class Scores:
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]  # [true][predicted]

    def table(self, labels: list[str]) -> str:
        w = max(8, *(len(lb) for lb in labels))
        head = " " * (w + 2) + "".join(f"{lb[:w]:>{w + 1}}" for lb in labels) + "   <- predicted"
        lines = [head] + [f"{lb[:w]:>{w}}  " + "".join(f"{c:>{w + 1}}" for c in row)
                          for lb, row in zip(labels, self.confusion)]
        return "\n".join(lines)


def score(y_true: list[int], y_pred: list[int], n: int) -> Scores:
    conf = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        conf[t, p] += 1
    f1s = []
    for c in range(n):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return Scores(float(np.trace(conf) / max(1, conf.sum())), float(np.mean(f1s)), conf.tolist())


def save_confusion_png(scores: Scores, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.array(scores.confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)), dpi=120)
    ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center",
                    color="white" if conf[i, j] > conf.max() / 2 else "black")
    ax.set_title(f"accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------- training
def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its metrics log and checkpoint (beside --out, which appears
    only when the run is done)."""
    return out.parent / f".{out.name}.partial"


@dataclass
class _Rows:
    texts: list[str]
    y: list[int]
    val_texts: list[str]
    y_val: list[int]
    dropped: int
    classes: list[str]


def _rows(train_path: Path, text_col: str, label_col: str, cfg: ClassifyConfig, val_path: Path | None) -> _Rows:
    """Training and validation rows with labels as class indices (cfg.labels is set): the
    validation rows from val_path, or whole texts held out of the training file."""
    texts, labels = read_rows(train_path, text_col, label_col, cfg.skip_empty)
    rng = random.Random(cfg.seed)
    if val_path is not None:
        val_texts, val_labels = read_rows(val_path, text_col, label_col, cfg.skip_empty)
        dropped = 0
    else:  # whole texts held out, stratified by label, and none of their phrases trained on
        split = whole_text_split(texts, labels, cfg.val_fraction, rng)
        val_texts, val_labels = [texts[i] for i in split.val], [labels[i] for i in split.val]
        texts, labels = [texts[i] for i in split.train], [labels[i] for i in split.train]
        dropped = split.dropped
    if cfg.drop_phrases:
        keep = whole_texts(texts)
        dropped += len(texts) - len(keep)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    classes = sorted(set(labels), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(classes) < 2:
        raise LMForgeError(f"{train_path}: only one class ({classes[0]!r}) in {label_col!r}; a classifier needs two or more")
    unseen = sorted(set(val_labels) - set(classes))
    if unseen:
        raise LMForgeError(f"validation labels never seen in training: {', '.join(unseen[:5])}")
    if not val_texts:
        raise LMForgeError("no validation rows: give --val or more training rows")
    if cfg.max_train is not None and len(texts) > cfg.max_train:
        keep = sorted(rng.sample(range(len(texts)), cfg.max_train))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    cfg.labels = classes
    lab = {c: i for i, c in enumerate(classes)}
    return _Rows(texts, [lab[lb] for lb in labels], val_texts, [lab[lb] for lb in val_labels], dropped, classes)


def finetune(enc, train_path: Path, text_col: str, label_col: str, out: Path, cfg: ClassifyConfig,
             val_path: Path | None = None, log=print, progress: bool = True, resume: bool = False,
             stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune a loaded encoder (lmforge.encoders.Encoder: its model, tokenizer and pooling)
    with a new head, in the shared training loop (lmforge.train.loop.fit); keeps the best
    validation accuracy. Returns the final report.

    A checkpoint (weights, best weights, optimizer moments, counters) is saved beside `out` at
    every validation; `resume` continues from it exactly: the batches of step k are a function of
    (seed, epoch) and dropout is re-seeded every step, so nothing depends on hidden RNG state.
    stop_after: stop after this many steps as a kill would (the last validation's checkpoint
    stays); Ctrl-C instead saves a checkpoint of the current step."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LMForgeError(f"{out} already exists and is not empty; choose another --out")
    part = partial_dir(out)
    ckpt_dir = part / "checkpoint"
    if resume and not (ckpt_dir / "progress.json").is_file():
        raise LMForgeError(f"nothing to resume: no interrupted run for {out}")
    if not resume and part.exists():
        if (ckpt_dir / "progress.json").is_file():
            raise LMForgeError(f"an interrupted run for {out} exists; add --resume to continue it, or delete {part}")
        shutil.rmtree(part)  # a run that died before its first checkpoint: nothing to keep
    rows = _rows(train_path, text_col, label_col, cfg, val_path)
    texts, y, val_texts, y_val, dropped, classes = rows.texts, rows.y, rows.val_texts, rows.y_val, rows.dropped, rows.classes

    seed_everything(cfg.seed)
    dev = enc.device
    enc.tk.enable_truncation(min(cfg.max_len, enc.settings.max_len))
    ids, val_ids = enc.tokenize(texts), enc.tokenize(val_texts)
    pad = enc.pad_id
    model = Classifier(enc.model, len(classes), enc.settings.pooling).to(dev)
    if cfg.lora_rank > 0:
        from lmforge.models.lora import add_lora

        add_lora(model.encoder, rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank)
        for p in model.head.parameters():
            p.requires_grad_(True)
    head_params = list(model.head.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    decay = [p for p in body if p.dim() >= 2]
    no_decay = [p for p in body if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                             {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
                             {"params": head_params, "weight_decay": 0.0, "lr": cfg.head_lr}])
    steps_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    counts = Counter(y)
    weight = None
    if cfg.class_weights:
        weight = torch.tensor([len(y) / (len(classes) * counts[c]) for c in range(len(classes))], device=dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{trainable:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}"
        + (f" (LoRA rank {cfg.lora_rank})" if cfg.lora_rank else ""))
    log(f"{len(ids):,} training rows, {len(val_ids):,} validation rows, {len(classes)} classes "
        f"({', '.join(f'{c}: {counts[k]}' for k, c in enumerate(classes))}); {total:,} steps on {dev}")
    if dropped:
        log(f"{dropped:,} training rows left out: they are phrases or copies of held-out texts"
            + (" (or, with drop_phrases, of longer training rows)" if cfg.drop_phrases else ""))

    from safetensors.torch import load_file

    task = _ClassifyTask(model, opt, cfg, ids, y, val_ids, y_val, pad, weight, steps_per_epoch, total, ckpt_dir)
    step = 0
    if resume:
        saved = json.loads((ckpt_dir / "progress.json").read_text(encoding="utf-8"))
        if saved["labels"] != classes or saved["train_rows"] != len(ids) or saved.get("settings") != task.settings():
            raise LMForgeError(f"the data or settings differ from the interrupted run in {part}; "
                               f"resume with the same ones")
        from lmforge.weights.checkpoint import restore_optimizer

        model.load_state_dict(load_file(str(ckpt_dir / "weights.safetensors"), device=str(dev)), strict=False)
        task.best_state = load_file(str(ckpt_dir / "best.safetensors"), device=str(dev))
        restore_optimizer(opt, load_file(str(ckpt_dir / "optimizer.safetensors"), device=str(dev)),
                          saved["optimizer"], ckpt_dir)
        task.best, task.stale, step = saved["best"], saved["stale"], saved["step"]
        log(f"resuming at step {step} of {total} (best validation accuracy so far {task.best:.4f})")

    part.mkdir(parents=True, exist_ok=True)
    model.train()
    t0 = time.perf_counter()
    try:
        res = fit(model, model, opt, task, steps=total, start_step=step, grad_clip=1.0, log_interval=10,
                  time_budget=cfg.time_budget, seed=cfg.seed, items_per_step=cfg.batch_size, unit="rows",
                  label="finetune", device=dev, metrics_path=part / "metrics.jsonl", show_progress=progress, log=log, stop_after=stop_after)
    except BaseException:
        if not (ckpt_dir / "progress.json").is_file():
            shutil.rmtree(part, ignore_errors=True)  # nothing worth resuming
        raise
    if res.stopped == "time budget" and not task.eval_due(res.step):
        row, _, _ = task.evaluate(res.step)  # the weights at the end of the schedule may be the best
        append_metrics(part / "metrics.jsonl", {"kind": "eval", "step": res.step, **row})
        log(f"time budget spent at step {res.step} of {total}; best validation accuracy {task.best:.4f}")
    if res.stopped == "early stop":
        log(f"early stop at step {res.step}: no better validation accuracy in {task.stale} checks")
    if res.stopped == "stop_after":  # as if killed here: the checkpoint of the last validation stays for --resume
        return {"stopped_at": res.step, "checkpoint": str(part)}
    if res.stopped == "interrupted":
        task.checkpoint(res.step)
        raise LMForgeError(f"interrupted at step {res.step}; continue with the same command and --resume")
    with atomic_dir(out) as tmp:
        from lmforge.train.plot import plot_loss

        shutil.copyfile(part / "metrics.jsonl", tmp / "metrics.jsonl")
        plot_loss(tmp / "metrics.jsonl", tmp / "loss.png", title=f"classifier ({len(classes)} classes)",
                  ylabel="cross-entropy (nats/row)")
        model.load_state_dict(task.best_state)
        if cfg.lora_rank > 0:
            from lmforge.models.lora import merge_lora

            merge_lora(model.encoder)
        final = task.validate()[0]
        save_classifier(tmp, model, enc, cfg)
        (tmp / "confusion.txt").write_text(final.table(classes) + "\n", encoding="utf-8")
        save_confusion_png(final, classes, tmp / "confusion.png")
        report = {"val_accuracy": final.accuracy, "val_macro_f1": final.macro_f1, "confusion": final.confusion,
                  "labels": classes, "train_rows": len(ids), "val_rows": len(val_ids), "dropped_rows": dropped,
                  "steps": res.step, "stopped": res.stopped, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(part, ignore_errors=True)
    return report


class _ClassifyTask(Task):
    """Classification as a task of the shared loop: batches, loss, schedule, validation with
    early stopping on accuracy, and a checkpoint after every validation."""

    def __init__(self, model: Classifier, opt, cfg: ClassifyConfig, ids, y, val_ids, y_val, pad: int, weight,
                 steps_per_epoch: int, total: int, ckpt_dir: Path):
        self.model, self.opt, self.cfg = model, opt, cfg
        self.ids, self.y, self.val_ids, self.y_val, self.pad, self.weight = ids, y, val_ids, y_val, pad, weight
        self.spe, self.total = steps_per_epoch, total
        self.warm = max(1, int(total * cfg.warmup_frac))
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        self.best, self.best_state, self.stale = -1.0, None, 0
        self.ckpt_dir = ckpt_dir
        self._epoch, self._groups = -1, []
        self.dev = model.head.weight.device

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.cfg).items() if k != "labels"}

    def _epoch_groups(self, epoch: int) -> list[list[int]]:
        # shuffled, then sorted by length within chunks of 50 batches (little padding, random
        # order); a function of (seed, epoch) alone, so a resumed run sees the same batches
        if epoch != self._epoch:
            erng = random.Random(self.cfg.seed * 1_000_003 + epoch)
            order = list(range(len(self.ids)))
            erng.shuffle(order)
            chunk = self.cfg.batch_size * 50
            order = [i for s in range(0, len(order), chunk)
                     for i in sorted(order[s:s + chunk], key=lambda i: len(self.ids[i]))]
            self._groups = [order[s:s + self.cfg.batch_size] for s in range(0, len(order), self.cfg.batch_size)]
            erng.shuffle(self._groups)
            self._epoch = epoch
        return self._groups

    def batch(self, step: int, micro: int):
        epoch = step // self.spe
        rows = self._epoch_groups(epoch)[step - epoch * self.spe]
        _, x, m = next(batches(self.ids, rows, len(rows), self.pad))
        return x.to(self.dev), m.to(self.dev), torch.tensor([self.y[i] for i in rows], device=self.dev)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, m, target = batch
        return F.cross_entropy(model(x, m), target, weight=self.weight)

    def set_lr(self, opt, progress_step: float) -> float:
        step, warm, total = progress_step, self.warm, self.total
        frac = (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
        for g, lr in zip(opt.param_groups, self.base_lrs):
            g["lr"] = lr * frac  # linear warmup, then linear decay to zero
        return self.base_lrs[0] * frac

    def eval_due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step % self.spe == 0

    checkpoint_due = eval_due

    def validate(self) -> tuple[Scores, float]:
        probs = predict_proba(self.model, self.val_ids, self.pad)
        self.model.train()
        return scored(probs, self.y_val)

    def evaluate(self, step: int):
        s, val_loss = self.validate()
        if s.accuracy > self.best:
            self.best, self.stale = s.accuracy, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.stale += 1
        row = {"epoch": round(step / self.spe, 3), "val_loss": val_loss, "val_accuracy": s.accuracy,
               "val_macro_f1": s.macro_f1}
        line = (f"step {step}: validation accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f}, "
                f"loss {val_loss:.4f} (best {self.best:.4f})")
        return row, line, self.stale >= self.cfg.patience

    def checkpoint(self, step: int) -> Path:
        from safetensors.torch import save_file

        from lmforge.weights.checkpoint import optimizer_tensors

        with atomic_dir(self.ckpt_dir) as tmp:
            save_file(_weights(self.model.state_dict(), self.model), str(tmp / "weights.safetensors"))
            save_file(_weights(self.best_state, self.model), str(tmp / "best.safetensors"))
            tensors, rest = optimizer_tensors(self.opt)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "progress.json").write_text(json.dumps(
                {"step": step, "best": self.best, "stale": self.stale, "total": self.total, "labels": self.cfg.labels,
                 "settings": self.settings(), "train_rows": len(self.ids), "optimizer": rest}), encoding="utf-8")
        return self.ckpt_dir


# ---------------------------------------------------------------- a head on a frozen decoder
PROBE_L2 = (0.01, 0.03, 0.1, 0.3, 1.0)
"""The L2 penalties (on the mean loss) of the heads fitted; their probabilities are averaged.
Choosing one by validation accuracy was noisier than the differences between them: over four
485-sentence validation splits of SST-2 the chosen head scored 0.906-0.915 on the test
sentences, the average of all five 0.915-0.920."""


def _fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, start=None, max_iter: int = 300,
                xt: torch.Tensor | None = None):
    """Multinomial logistic regression by L-BFGS on standardized features x (N, F): the weight
    (F, K), the bias (K,) and the training loss after each evaluation. start: a (weight, bias)
    to begin from (the solution for a neighbouring penalty is close, and saves most steps).
    xt: x transposed and contiguous, if the caller has it (made here otherwise)."""
    xt = x.t().contiguous() if xt is None else xt  # (F, N)
    w = start[0].clone() if start else torch.zeros(x.shape[1], n_classes)
    b = start[1].clone() if start else torch.zeros(n_classes)
    onehot = F.one_hot(y, n_classes).float()  # (N, K)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)
    trace: list[float] = []

    # the gradient by hand, with both products as wide row-major matmuls: autograd's x.T @ g
    # over a (N, F) matrix ran 8x slower on the CPU than g.T @ x
    def closure():
        logits = (w.t() @ xt).t() + b  # (N, K)
        logp = F.log_softmax(logits, -1)
        ce = -(logp * onehot).sum() / len(y)
        g = (logp.exp() - onehot) / len(y)  # (N, K) d ce / d logits
        w.grad = (g.t() @ x).t().contiguous() + l2 * w  # (F, K)
        b.grad = g.sum(0)
        trace.append(float(ce))
        return ce + 0.5 * l2 * (w * w).sum()

    opt.step(closure)
    return w, b, trace


def _probs(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Class probabilities (N, K) of standardized features x (N, F) under heads w (G, F, K), b
    (G, K): the mean of the G heads' softmaxes."""
    return F.softmax(torch.einsum("nf,gfk->gnk", x, w) + b[:, None], -1).mean(0).numpy()


def fit_probe(feats, train_path: Path, text_col: str, label_col: str, out: Path, cfg: ClassifyConfig,
              val_path: Path | None = None, log=print, progress: bool = True) -> dict[str, Any]:
    """A linear head on a frozen pretrained decoder (lmforge.encoders.DecoderFeatures): every
    training and validation text goes through the decoder once, the features are standardized,
    a logistic regression is fitted for each L2 penalty of PROBE_L2, and the classifier is the
    average of their probabilities (the validation rows score each and the average; nothing is
    chosen on them). Same data handling, run folder and report as `finetune` (epochs, lr and
    the other optimizer settings do not apply)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LMForgeError(f"{out} already exists and is not empty; choose another --out")
    if cfg.tune and not feats.tunable:
        raise LMForgeError(f"--tune trains the layers between the first and the last feature layer; "
                           f"layers {','.join(map(str, feats.layers))} have none between them")
    rows = _rows(train_path, text_col, label_col, cfg, val_path)
    classes, K = rows.classes, len(rows.classes)
    log(f"frozen {feats.spec}: features from layers {','.join(map(str, feats.layers))} "
        f"({feats.dim:,} per text), prompt {feats.template!r}")
    log(f"{len(rows.texts):,} training rows, {len(rows.val_texts):,} validation rows, {K} classes")
    if rows.dropped:
        log(f"{rows.dropped:,} training rows left out: phrases or copies of held-out texts"
            + (" or of longer training rows" if cfg.drop_phrases else ""))
    t0 = time.perf_counter()
    texts = rows.texts + rows.val_texts
    states = None
    with _progress(progress, "features", "texts", loss=False) as bar:
        task, done = bar.add_task("features", total=len(texts), rate=0.0), [0]

        def advance(k: int) -> None:
            done[0] += k
            bar.update(task, completed=done[0], rate=done[0] / max(time.perf_counter() - t0, 1e-9))

        if cfg.tune:  # the states below the tuned layers are kept: those layers are never run again
            states = feats.states(texts, progress=advance)
            x = _pool_all(feats, states)
        else:
            x = torch.from_numpy(feats.features(texts, progress=advance))
    seconds_feats = time.perf_counter() - t0
    log(f"features of {len(texts):,} texts in {seconds_feats:.0f} s ({len(texts) / seconds_feats:.1f} texts/s)")
    if states is not None:
        mb = sum(h.numel() * h.element_size() for h in states) / 2**20
        log(f"the states entering layer {feats.first} are kept for tuning: {mb:,.0f} MB")
    n = len(rows.texts)
    mean, std = x[:n].mean(0), x[:n].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y, y_val = torch.tensor(rows.y), rows.y_val
    if cfg.class_weights:
        log("class_weights does not apply to a frozen backbone's head; ignored")

    heads, metrics, traces = [], [], {}
    penalties = sorted(PROBE_L2, reverse=True)
    xt = x[:n].t().contiguous()
    for l2 in penalties:  # each from the solution of the next larger penalty
        w, b, trace = _fit_linear(x[:n], y, K, l2, heads[-1] if heads else None, xt=xt)
        heads.append((w, b))
        traces[l2] = trace
        s, nll = scored(_probs(x[n:], w[None], b[None]), y_val)
        metrics.append({"kind": "probe", "l2": l2, "train_loss": trace[-1], "iterations": len(trace),
                        "val_loss": nll, "val_accuracy": s.accuracy, "val_macro_f1": s.macro_f1})
        log(f"L2 {l2:g}: validation accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f}, loss {nll:.4f} "
            f"({len(trace)} L-BFGS evaluations)")
    w, b = torch.stack([h[0] for h in heads]), torch.stack([h[1] for h in heads])  # (G, F, K), (G, K)
    final, nll = scored(_probs(x[n:], w, b), y_val)
    log(f"the {len(heads)} heads averaged: validation accuracy {final.accuracy:.4f}, macro-F1 {final.macro_f1:.4f}, "
        f"loss {nll:.4f}")
    metrics.append({"kind": "probe", "l2": "average", "val_loss": nll, "val_accuracy": final.accuracy,
                    "val_macro_f1": final.macro_f1})
    mid = PROBE_L2[len(PROBE_L2) // 2]
    trace = traces[mid]
    lines = [{"kind": "train", "step": i + 1, "loss": v} for i, v in enumerate(trace)] + metrics
    title = f"linear head on frozen features (L2 {mid:g})"
    tuned: list[int] = []
    steps = len(trace)
    if cfg.tune:
        w, b, final, nll, tune_lines = _tune(feats, states, rows, mean, std, w.mean(0), b.mean(0), cfg, log, progress)
        lines = [{**r, "kind": "probe" if r["kind"] == "train" else r["kind"]} for r in lines] + tune_lines
        tuned = list(feats.tunable)
        title = f"layers {tuned[0]}-{tuned[-1]} and head tuned"
        steps = max((r["step"] for r in tune_lines if r["kind"] == "train"), default=0)
    with atomic_dir(out) as tmp:
        from safetensors.torch import save_file

        from lmforge.train.plot import plot_loss

        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
        plot_loss(tmp / "metrics.jsonl", tmp / "loss.png", title=title, ylabel="cross-entropy (nats/row)")
        save_file({"mean": mean.contiguous(), "std": std.contiguous(), "weight": w.detach().contiguous(),
                   "bias": b.detach().contiguous()}, str(tmp / "head.safetensors"))
        if tuned:
            prefixes = tuple(f"blocks.{i}." for i in tuned)
            save_file({k: v.detach().float().contiguous().cpu() for k, v in feats.lm.model.state_dict().items()
                       if k.startswith(prefixes)}, str(tmp / "layers.safetensors"))
        meta = {"format": "lmforge-classifier-1", "backbone": "frozen-lm", "labels": classes,
                "features": feats.settings(), "n_layer": feats.lm.config.n_layer, "n_embd": feats.lm.config.n_embd,
                "l2": penalties, "tuned_layers": tuned, "train": asdict(cfg)}
        (tmp / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "confusion.txt").write_text(final.table(classes) + "\n", encoding="utf-8")
        save_confusion_png(final, classes, tmp / "confusion.png")
        report = {"val_accuracy": final.accuracy, "val_macro_f1": final.macro_f1, "confusion": final.confusion,
                  "labels": classes, "train_rows": n, "val_rows": len(y_val), "dropped_rows": rows.dropped,
                  "l2": penalties, "feature_seconds": round(seconds_feats, 1), "steps": steps, "stopped": "done",
                  "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _pool_all(feats, states: list[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Features (N, dim) of every text from its stored states, in batches of similar length."""
    order = sorted(range(len(states)), key=lambda i: len(states[i]))
    out = torch.empty((len(states), feats.dim))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            out[rows] = feats.pool([states[i] for i in rows]).cpu()
    return out


class _TunedHead(nn.Module):
    """The tuned layers (shared with the decoder) and the linear head over standardized
    features: logits (B, K) of texts given their stored states."""

    def __init__(self, feats, mean: torch.Tensor, std: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.feats = feats
        t = feats.tunable
        self.layers = nn.ModuleList(feats.lm.model.blocks[t.start:t.stop])  # the final norm stays as it is
        self.weight, self.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())  # (F, K), (K,)
        self.register_buffer("mean", mean.to(feats.device))
        self.register_buffer("std", std.to(feats.device))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias  # (B, F) features -> (B, K) logits

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.feats.pool(states))


class _TuneTask(_ClassifyTask):
    """Tuning a decoder's feature layers as a task of the shared loop: the batches and the
    schedule of fine-tuning, over stored states; validation at each epoch's end only reports
    (the last weights are kept, so the validation rows choose nothing here either)."""

    def __init__(self, model: _TunedHead, opt, cfg: ClassifyConfig, states, y, n_train: int, y_val, spe: int,
                 total: int):
        self.model, self.opt, self.cfg, self.states = model, opt, cfg, states
        self.ids = states[:n_train]  # what _epoch_groups sorts by length
        self.y, self.y_val, self.n = y, y_val, n_train
        self.spe, self.total = spe, total
        self.warm = max(1, int(total * cfg.warmup_frac))
        self.base_lrs = [g["lr"] for g in opt.param_groups]
        self._epoch, self._groups = -1, []
        self.dev = model.weight.device

    def batch(self, step: int, micro: int):
        epoch = step // self.spe
        rows = self._epoch_groups(epoch)[step - epoch * self.spe]
        return [self.states[i] for i in rows], torch.tensor([self.y[i] for i in rows], device=self.dev)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        states, target = batch
        return F.cross_entropy(model(states), target)

    def eval_due(self, step: int) -> bool:
        return step % self.spe == 0

    def checkpoint_due(self, step: int) -> bool:
        return False

    def validate(self) -> tuple[Scores, float]:
        self.model.eval()
        with torch.no_grad():
            x = _pool_all(self.model.feats, self.states[self.n:]).to(self.dev)
            probs = F.softmax(self.model.head(x), -1).cpu().numpy()
        self.model.train()
        return scored(probs, self.y_val)

    def evaluate(self, step: int):
        s, val_loss = self.validate()
        row = {"epoch": round(step / self.spe, 3), "val_loss": val_loss, "val_accuracy": s.accuracy,
               "val_macro_f1": s.macro_f1}
        return row, (f"step {step}: validation accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f}, "
                     f"loss {val_loss:.4f}"), False


def _tune(feats, states: list[torch.Tensor], rows: _Rows, mean, std, w, b, cfg: ClassifyConfig, log, progress: bool):
    """Train the decoder's layers from the first feature layer up, and the head (started from
    the averaged probe), on the stored states: returns the head as one of (1, F, K), (1, K), the
    final validation scores and loss, and the metrics rows."""
    import tempfile

    from lmforge.models.quant import Int4Linear, Int8Linear

    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in feats.lm.model.blocks.modules()):
        raise LMForgeError("tuning needs the decoder's float weights (DecoderFeatures(..., quantize='none'))")
    seed_everything(cfg.seed)
    model = _TunedHead(feats, mean, std, w, b)
    for p in feats.lm.model.parameters():
        p.requires_grad_(False)
    body = [p for p in model.layers.parameters() if p.is_floating_point()]
    for p in body:
        p.requires_grad_(True)
    decay, no_decay = [p for p in body if p.dim() >= 2], [p for p in body if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                             {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
                             {"params": [model.weight, model.bias], "weight_decay": 0.0, "lr": 10 * cfg.lr}])
    n = len(rows.texts)
    spe = math.ceil(n / cfg.batch_size)
    total = spe * cfg.epochs
    log(f"tuning layers {feats.tunable[0]}-{feats.tunable[-1]} ({sum(p.numel() for p in body):,} "
        f"parameters) and the head: {cfg.epochs} epochs, {total:,} steps of {cfg.batch_size}, lr {cfg.lr:g}")
    task = _TuneTask(model, opt, cfg, states, rows.y, n, rows.y_val, spe, total)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        res = fit(model, model, opt, task, steps=total, grad_clip=1.0, log_interval=10, seed=cfg.seed,
                  items_per_step=cfg.batch_size, unit="texts", label="tune", device=feats.device,
                  metrics_path=Path(tmp) / "metrics.jsonl", show_progress=progress, log=log)
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    if res.stopped == "interrupted":
        raise LMForgeError(f"interrupted at step {res.step} of {total}; nothing saved (tuning does not resume)")
    for p in body:
        p.requires_grad_(False)
    model.eval()
    final, nll = task.validate()
    log(f"tuned: validation accuracy {final.accuracy:.4f}, macro-F1 {final.macro_f1:.4f}, loss {nll:.4f}")
    return model.weight.detach()[None].cpu(), model.bias.detach()[None].cpu(), final, nll, lines


def _load_tuned(folder: Path, feats, tuned: list[int]) -> None:
    """Put the tuned layers saved in the folder into the decoder, every tensor of them and
    nothing else (a damaged or foreign file is refused, not half applied)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "layers.safetensors"
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{path} is missing or corrupt ({str(e).splitlines()[0]})") from None
    prefixes = tuple(f"blocks.{i}." for i in tuned)
    model = feats.lm.model
    want = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    if saved.keys() != want.keys() or any(saved[k].shape != want[k].shape for k in want):
        raise LMForgeError(f"{path} does not hold layers {tuned[0]}-{tuned[-1]} of {feats.spec}; the folder is damaged")
    if not all(torch.isfinite(v).all() for v in saved.values()):
        raise LMForgeError(f"{path} holds non-finite weights; the folder is damaged")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in saved.items()}, strict=False)


class ProbeClassifier:
    """A folder made by fit_probe: the frozen decoder it names, its feature settings, and the head."""

    def __init__(self, feats, meta: dict, head: dict[str, torch.Tensor]):
        self.feats, self.labels = feats, list(meta["labels"])
        self.mean, self.std, self.w, self.b = head["mean"], head["std"], head["weight"], head["bias"]

    @classmethod
    def load(cls, folder: Path, meta: dict, device: str = "auto") -> "ProbeClassifier":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from lmforge.encoders import DecoderFeatures

        f = meta.get("features")
        if not isinstance(f, dict) or not {"model", "layers", "template", "max_len"} <= f.keys():
            raise LMForgeError(f"{folder / 'classifier.json'} lacks its feature settings; it is damaged")
        try:
            head = load_file(str(folder / "head.safetensors"))
        except (SafetensorError, OSError) as e:
            raise LMForgeError(f"{folder / 'head.safetensors'} is missing or corrupt ({str(e).splitlines()[0]})") from None
        tuned = meta.get("tuned_layers") or []
        feats = DecoderFeatures(f["model"], device, f["layers"], f["template"], int(f["max_len"]),
                                quantize="none" if tuned else "auto")
        if f.get("model_sha256") and feats.sha256 and f["model_sha256"] != feats.sha256:
            raise LMForgeError(f"{folder} was trained on the features of another file than {f['model']} is now "
                               f"(SHA-256 {f['model_sha256'][:12]}..., now {feats.sha256[:12]}...); train it again")
        if tuned:
            _load_tuned(folder, feats, tuned)
        C, K = feats.lm.config.n_embd, len(meta["labels"])
        if feats.lm.config.n_layer != meta.get("n_layer") or C != meta.get("n_embd"):
            raise LMForgeError(f"{folder} was trained on features of a model with {meta.get('n_layer')} layers "
                               f"{meta.get('n_embd')} wide; {f['model']} is {feats.lm.config.n_layer} x {C}")
        G = head["bias"].shape[0] if "bias" in head and head["bias"].dim() == 2 else -1
        shapes = {"mean": (feats.dim,), "std": (feats.dim,), "weight": (G, feats.dim, K), "bias": (G, K)}
        if G < 1 or any(k not in head or tuple(head[k].shape) != v for k, v in shapes.items()):
            raise LMForgeError(f"{folder / 'head.safetensors'} does not match classifier.json; the folder is damaged")
        return cls(feats, meta, head)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        x = (torch.from_numpy(self.feats.features(texts)) - self.mean) / self.std
        return _probs(x, self.w, self.b)

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        return [{"label": self.labels[int(p.argmax())], "probs": {lb: float(q) for lb, q in zip(self.labels, p)}}
                for p in self.predict_proba(list(texts))]

    def evaluate(self, texts: list[str], labels: list[str]) -> Scores:
        return evaluate_labels(self, texts, labels)


# ---------------------------------------------------------------- saving / loading
def _weights(state: dict[str, torch.Tensor], model: Classifier) -> dict[str, torch.Tensor]:
    """Tensors to save: a tied LM backbone's output projection is the embedding, kept once."""
    tied = model.causal and getattr(model.encoder.config, "tie_embeddings", False)
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if not (tied and k == "encoder.lm_head.weight")}


def save_classifier(folder: Path, model: Classifier, enc, cfg: ClassifyConfig) -> None:
    from safetensors.torch import save_file

    save_file(_weights(model.state_dict(), model), str(folder / "model.safetensors"))
    enc.tk.save(str(folder / "tokenizer.json"))
    meta = {"format": "lmforge-classifier-1", "labels": cfg.labels, "pooling": model.pooling,
            "max_len": cfg.max_len, "pad_id": enc.pad_id, "backbone": "lm" if model.causal else "encoder",
            "encoder": asdict(model.encoder.config), "train": asdict(cfg)}
    (folder / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class TextClassifier:
    """A fine-tuned classifier folder, ready to label text."""

    def __init__(self, model: Classifier, tokenizer, labels: list[str], pad_id: int = 0):
        self.model, self.tk, self.labels, self.pad_id = model.eval(), tokenizer, labels, pad_id

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> "TextClassifier | ProbeClassifier":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        from lmforge.common import pick_device
        from lmforge.config import load_json

        folder = Path(folder)
        if not (folder / "classifier.json").is_file():
            raise LMForgeError(f"{folder} is not an lmforge classifier (no classifier.json; make one with "
                               f"lmforge finetune classify)")
        meta = load_json(folder / "classifier.json")
        if not isinstance(meta, dict) or meta.get("format") != "lmforge-classifier-1":
            raise LMForgeError(f"{folder} is not an lmforge classifier (made by lmforge finetune classify)")
        if meta.get("backbone") == "frozen-lm":
            return ProbeClassifier.load(folder, meta, device)
        dev = pick_device(device)
        if meta.get("backbone", "encoder") == "lm":
            from lmforge.config import ModelConfig
            from lmforge.models import build_model

            backbone = build_model(ModelConfig.from_dict(meta["encoder"]), device=dev, init=False)
        else:
            with torch.device("meta"):
                backbone = BertEncoder(EncoderConfig.from_dict(meta["encoder"]))
        model = Classifier(backbone, len(meta["labels"]), meta.get("pooling", "mean"))
        try:
            state = load_file(str(folder / "model.safetensors"), device=str(dev))
            model.load_state_dict(state, assign=True, strict=False)
            if model.causal:
                model.encoder.reset_buffers()
                if model.encoder.config.tie_embeddings:
                    model.encoder.lm_head.weight = model.encoder.embed.weight
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LMForgeError(f"{folder / 'model.safetensors'} is missing or corrupt ({str(e).splitlines()[0]})") from None
        try:
            tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception for a missing or bad file
            raise LMForgeError(f"{folder / 'tokenizer.json'} is missing or not a tokenizer.json ({e})") from None
        tk.no_padding()
        tk.enable_truncation(int(meta.get("max_len", 128)))
        missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                   if t.is_meta and not n.startswith("encoder.rope_")]
        if missing:
            raise LMForgeError(f"{folder / 'model.safetensors'} lacks {', '.join(missing[:3])}")
        return cls(model.to(dev), tk, list(meta["labels"]), int(meta.get("pad_id", 0)))

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        ids = [e.ids for e in self.tk.encode_batch(list(texts))]
        probs = predict_proba(self.model, ids, self.pad_id)
        return [{"label": self.labels[int(p.argmax())], "probs": {lb: float(q) for lb, q in zip(self.labels, p)}}
                for p in probs]

    def evaluate(self, texts: list[str], labels: list[str]) -> Scores:
        return evaluate_labels(self, texts, labels)


def evaluate_labels(clf, texts: list[str], labels: list[str]) -> Scores:
    """Scores of anything with `labels` and `predict(texts)` (a trained or a zero-shot classifier)."""
    unknown = sorted(set(labels) - set(clf.labels))
    if unknown:
        raise LMForgeError(f"labels the classifier does not know: {', '.join(unknown[:5])}")
    pred = [clf.labels.index(r["label"]) for r in clf.predict(texts)]
    return score([clf.labels.index(lb) for lb in labels], pred, len(clf.labels))
