"""Teaching a frozen decoder to see: an image encoder + projector trained on a CPU, LLaVA's recipe
in two stages, in the shared training loop.

1. align: image-caption pairs; the encoder and projector learn to write vectors that the frozen
   decoder reads as a description of the image.
2. instruct: image-question-answer triples; the same parts learn to answer questions.

The loss is the cross-entropy of the reply tokens only (the prompt, image and question, is given).
The decoder never changes, so a run stores only the tower (weights/vision.py) and names its
decoder. Data: the easy-vqa package (64x64 shapes, 13 answers; MIT) when no folder is given, or a
folder with train.jsonl (and optionally test.jsonl) of {"image": path, "question": q, "answer": a}
or {"image": path, "caption": c} rows, image paths relative to the folder. Validation holds out
whole images (all their questions), 5% of the training images.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import atomic_dir, seed_everything
from lmforge.config import VisionConfig
from lmforge.engine import Engine
from lmforge.engine.vision import model_device
from lmforge.errors import LMForgeError
from lmforge.images import answer_ids, question_ids
from lmforge.models.lora import adapter_state, add_lora
from lmforge.models.vision import IMAGE, VisionTower, build_tower
from lmforge.train.loop import Task, append_metrics, fit
from lmforge.train.optim import lr_at
from lmforge.vqa import VQAData, load_data, vqa_accuracy

# ---------------------------------------------------------------- training
@dataclass
class VisionTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    """Questions (or captions) per step."""
    pack: int = 8
    """Up to this many questions about one image share a sequence: the prompt's start and the image
    are computed once, each question sees them and itself only, at the positions it would have
    alone (so it learns exactly what a lone prompt would teach, for about half the compute)."""
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    align_frac: float = 0.1
    """Share of the steps spent on captions (the align stage), when the data has captions."""
    text_frac: float = 0.25
    """With adapters (lora_rank > 0) and captions: share of the steps, first of all, in which the
    adapters learn the questions from each image's caption words put where the image goes (the
    frozen decoder cannot compare "is there a red shape?" with a red circle, even told in words;
    taught on text, where the answer is plain, it then learns to read the image the same way)."""
    time_budget: float | None = None
    """Seconds for the whole training, the encoder's warm-up included: the schedule follows the
    clock and training stops when it runs out (the last validation and saving come after)."""
    eval_every: int = 250
    val_images: float = 0.05
    """Share of the training images held out (with all their questions) for validation."""
    val_questions: int = 200
    """Validation questions answered at each evaluation (a fixed sample of the held-out ones)."""
    encoder_warmup: int = 600
    """Steps (batches of 64 images) that first teach the encoder alone to name the words of each
    image's caption, before the decoder is involved (cheap: no decoder forward)."""
    balance: bool = False
    """Weight each reply so that every question's answers count equally in the loss (a question
    asked of many images, "is there a red shape?", is answered "no" far more often than "yes";
    unweighted, a frozen decoder learned that prior instead of looking at the image). Off by
    default: without adapters it learned more slowly in a short run, and with them the errors
    were no longer one-sided."""
    lora_rank: int = 8
    """Rank of low-rank adapters on the decoder's attention and MLP projections, trained with the
    tower (0: the decoder stays exactly as it is)."""
    lora_lr_scale: float = 0.5
    """The adapters' learning rate as a share of lr."""
    seed: int = 1337
    vision: dict = field(default_factory=dict)
    """VisionConfig overrides (image_size, channels, shuffle, ...)."""


def _rows_split(data: VQAData, share: float, rng: random.Random) -> tuple[list, list]:
    imgs = sorted({r[0] for r in data.rows})
    rng.shuffle(imgs)
    held = set(imgs[:max(1, round(len(imgs) * share))]) if len(imgs) > 1 else set()
    return [r for r in data.rows if r[0] not in held], [r for r in data.rows if r[0] in held and r[3] != "caption"]


class VisionTask(Task):
    def __init__(self, lm_model, tok, tower: VisionTower, opt, cfg: VisionTrainConfig, data: VQAData, train_rows,
                 val_rows, chat: bool, ckpt_dir: Path):
        self.lm, self.tok, self.tower, self.opt, self.cfg, self.data = lm_model, tok, tower, opt, cfg, data
        self.chat, self.ckpt_dir, steps = chat, ckpt_dir, cfg.steps
        self.qa = [r for r in train_rows if r[3] != "caption"]
        self.caps = [r for r in train_rows if r[3] == "caption"]
        self.by_image: dict[int, list] = {}
        for r in self.qa:
            self.by_image.setdefault(r[0], []).append(r)
        self.qa_images = sorted(self.by_image)
        self.weight = answer_balance(self.qa) if cfg.balance else {}
        self.align_steps = int(steps * cfg.align_frac) if self.caps else 0
        self.caption_of = {r[0]: r[2] for r in self.caps}
        self.text_images = [i for i in self.qa_images if i in self.caption_of] if cfg.lora_rank else []
        self.text_steps = int(steps * cfg.text_frac) if self.text_images else 0
        self.val = val_rows
        self._prompt_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.best, self.best_state = -1.0, None
        self.sched = SimpleNamespace(lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, steps=steps)
        self.engine: Engine | None = None
        self._t0: float | None = None
        self.budget = cfg.time_budget  # what is left of it for the decoder-backed stages (train_vision sets it)

    def _ids(self, q: str, a: str) -> tuple[list[int], list[int]]:
        key = (q, a)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = (question_ids(self.tok, q, self.chat), answer_ids(self.tok, a, self.chat))
        return self._prompt_cache[key]

    def stage(self, step: int) -> str:
        """"text" (the adapters on caption words), "align" (captions) or "questions": by steps,
        or on a time budget by the share of the time spent (the step count is then not known)."""
        text = self.cfg.text_frac if self.text_images else 0.0
        align = self.cfg.align_frac if self.caps else 0.0
        if self.cfg.time_budget:
            if self._t0 is None:
                self._t0 = time.perf_counter()
            done = (time.perf_counter() - self._t0) / self.budget
            return "text" if done < text else "align" if done < text + align else "questions"
        return "text" if step < self.text_steps else "align" if step < self.text_steps + self.align_steps \
            else "questions"

    def batch(self, step: int, micro: int) -> tuple[str, list[list[tuple]]]:
        """The stage, and groups of rows about one image each (captions: one per group),
        batch_size rows in all."""
        rng = random.Random(self.cfg.seed * 1_000_003 + step * 8_191 + micro)  # a function of the step: exact resume
        n, stage = self.cfg.batch_size, self.stage(step)
        if stage == "align":
            return stage, [[self.caps[rng.randrange(len(self.caps))]] for _ in range(n)]
        images = self.text_images if stage == "text" else self.qa_images
        groups: list[list[tuple]] = []
        while n > 0:
            rows = self.by_image[images[rng.randrange(len(images))]]
            groups.append(rng.sample(rows, min(len(rows), max(1, self.cfg.pack), n)))
            n -= len(groups[-1])
        return stage, groups

    def _caption_ids(self, image: int) -> list[int]:
        return self.tok.encode(self.caption_of[image], check=False)

    def _pack(self, rows, image: torch.Tensor):
        """One image's rows as one sequence: the prompt up to the image and the image's vectors
        once, then each row's rest of prompt + reply. Returns embeddings (T, C), positions (T,),
        segment of each token (T,) (0 = shared) and targets (T,) (-1 where nothing is learned)."""
        dev = image.device
        head, tails = None, []
        for _, q, a, _ in rows:
            p_ids, a_ids = self._ids(q, a)
            cut = p_ids.index(IMAGE)
            if head is None:
                head = p_ids[:cut]
            elif p_ids[:cut] != head:
                raise ValueError("rows packed together must share the prompt up to the image")
            tails.append((p_ids[cut + 1:], a_ids))
        ids = torch.tensor(head + [t for p, a in tails for t in p + a], device=dev)
        tok = self.lm.embed(ids[None])[0]  # (H + sum of tails, C)
        shared = len(head) + image.size(0)
        seq = torch.cat([tok[:len(head)], image.to(tok.dtype), tok[len(head):]])  # (T, C)
        positions = list(range(shared))
        segment = [0] * shared
        target = [-1] * shared
        weight = [0.0] * shared
        for j, ((p, a), row) in enumerate(zip(tails, rows), 1):
            positions += range(shared, shared + len(p) + len(a))
            segment += [j] * (len(p) + len(a))
            target += [-1] * (len(p) - 1) + a + [-1]  # position i predicts token i + 1: the reply's tokens
            w = self.weight.get((row[1], row[2]), 1.0)
            weight += [0.0] * (len(p) - 1) + [w] * len(a) + [0.0]
        as_t = lambda v: torch.tensor(v, device=dev)  # noqa: E731
        return seq, as_t(positions), as_t(segment), as_t(target), as_t(weight)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        stage, groups = batch
        dev = next(self.tower.parameters()).device
        if stage == "text":  # the caption's words where the image goes
            images = [self.lm.embed(torch.tensor([self._caption_ids(g[0][0])], device=dev))[0] for g in groups]
        else:
            images = self.tower(self.data.images[[g[0][0] for g in groups]].to(dev))  # (G, N + 2, C)
        packs = [self._pack(rows, images[k]) for k, rows in enumerate(groups)]
        T = max(p[0].size(0) for p in packs)
        pad = lambda t, v: F.pad(t, (0, T - t.size(0)), value=v)  # noqa: E731
        x = torch.stack([F.pad(p[0], (0, 0, 0, T - p[0].size(0))) for p in packs])  # (G, T, C), right-padded
        pos = torch.stack([pad(p[1], 0) for p in packs])  # (G, T)
        seg = torch.stack([pad(p[2], -1) for p in packs])  # (G, T); padding is segment -1
        y = torch.stack([pad(p[3], -1) for p in packs])  # (G, T)
        w = torch.stack([pad(p[4], 0.0) for p in packs])  # (G, T)
        order = torch.arange(T, device=dev)
        # query i sees key k <= i of the shared start or of its own segment (padding sees itself)
        mask = (order[None, :] <= order[:, None])[None] & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
        hidden = self.lm(input_embeds=x, return_hidden=True, positions=pos, attn_mask=mask)[0]  # (G, T, C)
        keep = y >= 0
        logits = self.lm.lm_head(hidden[keep])  # (M, V): the reply positions only
        ce = F.cross_entropy(logits.float(), y[keep], reduction="none")  # (M,)
        return (ce * w[keep]).sum() / w[keep].sum()

    def set_lr(self, opt, progress_step: float) -> float:
        lr = lr_at(progress_step, self.sched)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def eval_due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0

    def validate(self) -> tuple[float, dict[str, float]]:
        if not self.val:
            return float("nan"), {}
        rng = random.Random(self.cfg.seed)
        rows = self.val if len(self.val) <= self.cfg.val_questions else rng.sample(self.val, self.cfg.val_questions)
        acc = vqa_accuracy(self.engine_for(), self.tower, self.tok, self.chat, self.data.images, rows)
        self.tower.train()
        return acc["all"], acc

    def engine_for(self) -> Engine:
        if self.engine is None:
            self.engine = Engine(self.lm)
        return self.engine

    def evaluate(self, step: int):
        acc, per = self.validate()
        if acc >= self.best:  # ties go to the later, better-trained tower
            self.best = acc
            self.best_state = {k: v.clone() for k, v in self.trained_state().items()}
        row = {"val_accuracy": acc, **{f"val_acc_{k}": v for k, v in per.items() if k != "all"}}
        stage = self.stage(step - 1)
        return row, f"step {step} ({stage}): validation accuracy {acc:.4f} (best {self.best:.4f})", False

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What training changes: the tower ("tower." keys) and the decoder's adapters ("lm.")."""
        return {**{f"tower.{k}": v.detach() for k, v in self.tower.state_dict().items()},
                **{f"lm.{k}": v for k, v in adapter_state(self.lm).items()}}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        self.tower.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("tower.")})
        lora = {k[3:]: v for k, v in state.items() if k.startswith("lm.")}
        if set(lora) != set(adapter_state(self.lm)):
            raise LMForgeError("the checkpoint's adapters do not match the run's settings")
        self.lm.load_state_dict(lora, strict=False)

    def checkpoint_due(self, step: int) -> bool:
        return self.eval_due(step)

    def checkpoint(self, step: int) -> Path:
        from safetensors.torch import save_file

        from lmforge.weights.checkpoint import optimizer_tensors

        with atomic_dir(self.ckpt_dir) as tmp:
            save_file({k: v.contiguous() for k, v in self.trained_state().items()}, str(tmp / "trained.safetensors"))
            if self.best_state is not None:
                save_file({k: v.contiguous() for k, v in self.best_state.items()}, str(tmp / "best.safetensors"))
            tensors, rest = optimizer_tensors(self.opt)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "progress.json").write_text(json.dumps({"step": step, "best": self.best, "optimizer": rest,
                                                           "settings": asdict(self.cfg)}), encoding="utf-8")
        return self.ckpt_dir


def answer_balance(rows) -> dict[tuple[str, str], float]:
    """(question, answer) -> loss weight: each question text keeps its share of the rows, split
    evenly among the answers it has (weight = n(q) / (answers of q * n(q, a))), so no answer
    can be told from the question's words alone. Questions with a single answer weigh 1."""
    n_q: dict[str, int] = {}
    n_qa: dict[tuple[str, str], int] = {}
    for _, q, a, _ in rows:
        n_q[q] = n_q.get(q, 0) + 1
        n_qa[q, a] = n_qa.get((q, a), 0) + 1
    answers: dict[str, int] = {}
    for q, _ in n_qa:
        answers[q] = answers.get(q, 0) + 1
    return {(q, a): n_q[q] / (answers[q] * n) for (q, a), n in n_qa.items()}


def warm_up_encoder(tower: VisionTower, data: VQAData, rows, steps: int, seed: int, log=print) -> float | None:
    """Multi-label training of the encoder on its own: from the pooled grid features, predict
    which words of the caption vocabulary (words in 2+ captions) each image's captions hold. The
    decoder-backed stages then start from features that already tell colours and shapes apart."""
    caps = [(r[0], set(r[2].lower().split())) for r in rows if r[3] == "caption"]
    counts: dict[str, int] = {}
    for _, ws in caps:
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
    vocab = sorted(w for w, c in counts.items() if c >= 2)[:512]
    if steps <= 0 or len(caps) < 8 or len(vocab) < 2:
        return None
    index = {w: i for i, w in enumerate(vocab)}
    dev = next(tower.parameters()).device
    target = torch.zeros(len(caps), len(vocab), device=dev)
    for k, (_, ws) in enumerate(caps):
        for w in ws:
            if w in index:
                target[k, index[w]] = 1.0
    head = nn.Linear(tower.config.channels[-1], len(vocab)).to(dev)
    opt = torch.optim.AdamW([*tower.encoder.parameters(), *head.parameters()], lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.tensor([c[0] for c in caps])
    t0, loss = time.perf_counter(), torch.zeros(())
    for _ in range(steps):
        pick = torch.randint(len(caps), (64,), generator=gen)
        feats = tower.encoder(tower.normalize(data.images[imgs[pick]].to(dev))).mean((2, 3))  # (64, C)
        loss = F.binary_cross_entropy_with_logits(head(feats), target[pick.to(dev)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    log(f"encoder warm-up: {steps} steps on {len(caps):,} captions ({len(vocab)} words), loss {loss.item():.4f}, "
        f"{time.perf_counter() - t0:.1f} s")
    return loss.item()


LORA_TARGETS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def train_vision(lm_model, tok, lm_spec: str, chat: bool, out: Path, cfg: VisionTrainConfig,
                 data_dir: Path | None = None, log=print, progress: bool = True, resume: bool = False,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Train a tower for a loaded, frozen decoder (float weights); writes the run folder `out`
    (vision.json, vision.safetensors, metrics.jsonl, loss.png, report.json). Returns the report."""
    from safetensors.torch import load_file

    from lmforge.weights.checkpoint import restore_optimizer
    from lmforge.weights.vision import save_vision

    t_start = time.perf_counter()
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
        shutil.rmtree(part)
    vcfg = VisionConfig(**{**cfg.vision, "lm_embd": lm_model.config.n_embd})
    t_load = time.perf_counter()
    data = load_data(data_dir, "train", vcfg.image_size)
    train_rows, val_rows = _rows_split(data, cfg.val_images, random.Random(cfg.seed))
    log(f"data: {len(data.images):,} images, {sum(r[3] != 'caption' for r in train_rows):,} training questions, "
        f"{sum(r[3] == 'caption' for r in train_rows):,} captions, {len(val_rows):,} validation questions on held-out "
        f"images (read in {time.perf_counter() - t_load:.1f} s)")

    seed_everything(cfg.seed)
    dev = model_device(lm_model)
    lm_model.eval().requires_grad_(False)
    embed_std = float(lm_model.embed.weight.float().std())
    tower = build_tower(vcfg, dev, embed_std)
    groups = [{"params": list(tower.parameters())}]
    lora = {"rank": cfg.lora_rank, "alpha": 2.0 * cfg.lora_rank, "targets": list(LORA_TARGETS)} \
        if cfg.lora_rank else None
    if lora:
        add_lora(lm_model, lora["rank"], lora["alpha"], LORA_TARGETS)
        groups.append({"params": [p for p in lm_model.parameters() if p.requires_grad], "lr_scale": cfg.lora_lr_scale,
                       "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    task = VisionTask(lm_model, tok, tower, opt, cfg, data, train_rows, val_rows, chat, ckpt_dir)
    step = 0
    if not resume:
        warm_up_encoder(tower, data, train_rows, cfg.encoder_warmup, cfg.seed, log)
    if resume:
        saved = json.loads((ckpt_dir / "progress.json").read_text(encoding="utf-8"))
        if saved.get("settings") != json.loads(json.dumps(asdict(cfg))):
            raise LMForgeError(f"the settings differ from the interrupted run in {part}; resume with the same ones")
        task.load_trained_state(load_file(str(ckpt_dir / "trained.safetensors"), device=str(dev)))
        if (ckpt_dir / "best.safetensors").is_file():
            task.best_state = load_file(str(ckpt_dir / "best.safetensors"), device=str(dev))
        restore_optimizer(opt, load_file(str(ckpt_dir / "optimizer.safetensors"), device=str(dev)),
                          saved["optimizer"], ckpt_dir)
        task.best, step = saved["best"], saved["step"]
        log(f"resuming at step {step} of {cfg.steps}")
    log(f"tower: {sum(p.numel() for p in tower.parameters()):,} trainable parameters, {vcfg.n_tokens} image tokens "
        f"+ 2 markers per image; "
        + (f"decoder frozen but for rank-{cfg.lora_rank} adapters; " if cfg.lora_rank else "decoder frozen; ")
        + (f"caption words for {cfg.text_frac if task.text_images else 0:.0%} of the time, captions for "
           f"{cfg.align_frac if task.caps else 0:.0%}, then questions" if cfg.time_budget
           else f"{task.text_steps} caption-word steps, {task.align_steps} caption steps, then questions"))
    part.mkdir(parents=True, exist_ok=True)
    if cfg.time_budget:  # the data, the decoder's setup and the warm-up came out of it
        task.budget = max(1.0, cfg.time_budget - (time.perf_counter() - t_start))
    tower.train()
    t0 = time.perf_counter()
    try:
        trained = nn.ModuleDict({"tower": tower, "lm": lm_model})  # clipping sees the adapters' gradients too
        res = fit(trained, trained, opt, task, steps=cfg.steps, start_step=step, grad_clip=1.0, log_interval=10,
                  time_budget=task.budget, seed=cfg.seed, items_per_step=cfg.batch_size, unit="rows",
                  label="vision", device=dev, metrics_path=part / "metrics.jsonl", show_progress=progress, log=log,
                  stop_after=stop_after)
    except BaseException:
        if not (ckpt_dir / "progress.json").is_file():
            shutil.rmtree(part, ignore_errors=True)
        raise
    if res.stopped == "stop_after":
        return {"stopped_at": res.step, "checkpoint": str(part)}
    if res.stopped == "interrupted":
        task.checkpoint(res.step)
        raise LMForgeError(f"interrupted at step {res.step}; continue with the same command and --resume")
    if res.evaluated_at != res.step:
        row, line, _ = task.evaluate(res.step)
        append_metrics(part / "metrics.jsonl", {"kind": "eval", "step": res.step, **row})
        log(line)
    seconds = time.perf_counter() - t0
    with atomic_dir(out) as tmp:
        from lmforge.train.plot import plot_loss

        shutil.copyfile(part / "metrics.jsonl", tmp / "metrics.jsonl")
        plot_loss(tmp / "metrics.jsonl", tmp / "loss.png", title="vision tower (reply tokens)",
                  ylabel="cross-entropy (nats/token)")
        if task.best_state is not None:
            task.load_trained_state(task.best_state)
        report = {"val_accuracy": task.best, "steps": res.step, "stopped": res.stopped, "seconds": round(seconds, 1),
                  "train_questions": len(task.qa), "captions": len(task.caps), "val_questions": len(val_rows)}
        save_vision(tmp, tower.eval(), lm_spec, chat, {"train": asdict(cfg), "report": report},
                    adapters=adapter_state(lm_model) if lora else None, lora=lora)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(part, ignore_errors=True)
    return report
