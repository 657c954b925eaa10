"""The one training loop, for every model family.

Read top to bottom: setup -> data -> model -> optimizer (+ resume) -> loop -> final save.

Determinism, which is what makes resume exact: the micro-batch for (step, micro-batch index)
is drawn from a generator seeded by those numbers, and the global RNG is re-seeded at every
step (dropout). A resumed run therefore continues the very same loss trajectory, and a
2-process DDP run sees the same global batch as a 1-process run with twice the accumulation.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from lmforge.common import (DistInfo, atomic_write_text, autocast, destroy_distributed, human_count, init_distributed,
                            pick_dtype, seed_everything)
from lmforge.config import ModelConfig, TrainConfig
from lmforge.corpus import Corpus
from lmforge.errors import LMForgeError
from lmforge.models import build_model, count_params
from lmforge.tokenizer import LMTokenizer
from lmforge.train.data import TokenData, prepare_data
from lmforge.train.evaluate import Accumulator, EvalResult, evaluate_windows
from lmforge.train.optim import lr_at, make_optimizer
from lmforge.weights.checkpoint import (load_model, load_optimizer_state, prune_checkpoints, read_checkpoint,
                                        save_checkpoint, write_latest)

FULL_EVAL_CAP = 1_000_000  # validation tokens scored at the end of a run (a bigger split: its start)


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    step: int
    stopped: str  # "done", "time budget", "stop_after", "interrupted"
    tokens_per_s: float
    train_seconds: float
    params: int
    final_eval: dict[str, float] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)


def _batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 8_191 + micro)


class _NullProgress:
    def __init__(self, *a, **k):
        self.console = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def _progress(enabled: bool, label: str = "train", unit: str = "tok", loss: bool = True):
    """A rich bar with the fields rate (and loss): what training and feature extraction show."""
    if not enabled:
        return _NullProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    *([TextColumn("loss {task.fields[loss]:.4f}")] if loss else []),
                    TextColumn("{task.fields[rate]:,.0f} " + unit + "/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


# ---------------------------------------------------------------------- the shared loop
class Task:
    """What differs between kinds of training (a language model, a classifier); `fit` does the
    rest: accumulation, mixed precision, clipping, the schedule, progress, the metrics log,
    evaluation and checkpoint timing, stopping, and the exact-resume seeding."""

    def batch(self, step: int, micro: int) -> Any:
        """The micro-batch `micro` (global index across processes) of optimizer step `step`; a
        pure function of those numbers, so a resumed run sees the same data."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def set_lr(self, opt: torch.optim.Optimizer, progress_step: float) -> float:
        """Set the learning rates for this step; return the one to log."""
        raise NotImplementedError

    def eval_due(self, step: int) -> bool:
        return False

    def evaluate(self, step: int) -> tuple[dict[str, float], str, bool]:
        """(metrics row, line to show, stop early?)"""
        return {}, "", False

    def checkpoint_due(self, step: int) -> bool:
        return False

    def checkpoint(self, step: int) -> Path | None:
        return None


@dataclass
class FitResult:
    step: int
    stopped: str  # "done", "early stop", "time budget", "stop_after", "interrupted"
    steps_this_run: int
    train_seconds: float
    losses: list[tuple[int, float]]
    last_eval: dict[str, float]
    evaluated_at: int  # step of the last evaluation (-1: none this run)


def fit(model: nn.Module, raw: nn.Module, opt: torch.optim.Optimizer, task: Task, *, steps: int, start_step: int = 0,
        accum: int = 1, grad_clip: float = 1.0, log_interval: int = 10, time_budget: float | None = None,
        seed: int = 0, items_per_step: int = 1, unit: str = "tok", label: str = "train",
        scaler: torch.amp.GradScaler | None = None, dist: DistInfo | None = None, device: torch.device | None = None,
        dtype: torch.dtype = torch.float32, metrics_path: Path | None = None, show_progress: bool = True,
        log: Callable[[str], None] = print, stop_after: int | None = None) -> FitResult:
    """Run optimizer steps start_step+1 .. steps of `task` on `model` (`raw` is the module under
    any DDP/compile wrapper). `accum` is the global number of micro-batches per step; each of the
    dist.world_size processes does its share. Ctrl-C ends the loop cleanly (stopped="interrupted")."""
    dist = dist or DistInfo()
    device = device or next(raw.parameters()).device
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    if accum % dist.world_size:
        raise LMForgeError(f"grad_accum ({accum}) must be a multiple of the number of processes ({dist.world_size})")
    local = accum // dist.world_size
    if metrics_path is not None and dist.master:
        _trim_metrics(metrics_path, start_step)
    step, steps_this_run, train_time = start_step, 0, 0.0
    losses: list[tuple[int, float]] = []
    last_eval: dict[str, float] = {}
    evaluated_at, stopped = -1, "done"
    rate_ema, t_start = 0.0, time.perf_counter()

    def write(row: dict[str, Any]) -> None:
        if mlog is not None:
            mlog.write(json.dumps(row) + "\n")
            mlog.flush()

    with _progress(show_progress and dist.master, label, unit) as progress, _sigterm_as_interrupt(), \
            (open(metrics_path, "a", encoding="utf-8") if metrics_path is not None and dist.master
             else contextlib.nullcontext()) as mlog:
        bar = progress.add_task(label, total=steps, completed=step, loss=float("nan"), rate=0.0)
        say = progress.console.print if progress.console is not None else log
        try:
            while step < steps:
                if stop_after is not None and steps_this_run >= stop_after:
                    stopped = "stop_after"
                    break
                if _out_of_time(time_budget, t_start, dist, device):
                    stopped = "time budget"
                    break
                t0 = time.perf_counter()
                progress_step = step
                if time_budget:  # a time-budgeted run measures its progress through the schedule in time
                    progress_step = max(step, steps * (t0 - t_start) / time_budget)
                lr = task.set_lr(opt, progress_step)
                torch.manual_seed(seed + step * dist.world_size + dist.rank)  # dropout masks: a function of the step

                loss_sum = torch.zeros((), device=device)
                for micro in range(local):
                    batch = task.batch(step, dist.rank * local + micro)
                    sync = micro == local - 1 or not dist.enabled
                    with (contextlib.nullcontext() if sync else model.no_sync()):
                        with autocast(device, dtype):
                            loss = task.loss(model, batch) / local
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                if grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                step += 1
                steps_this_run += 1

                log_now = step % log_interval == 0 or step == steps
                if log_now:
                    if dist.enabled:
                        import torch.distributed as tdist

                        tdist.all_reduce(loss_sum)
                        loss_sum /= dist.world_size
                    loss_val = float(loss_sum)
                    if not math.isfinite(loss_val):
                        raise LMForgeError(f"training diverged at step {step} (loss is {loss_val}); try a lower --lr")
                dt = time.perf_counter() - t0
                train_time += dt
                rate = items_per_step / dt
                rate_ema = rate if rate_ema == 0 else 0.9 * rate_ema + 0.1 * rate
                if log_now:
                    losses.append((step, loss_val))
                    write({"kind": "train", "step": step, "loss": loss_val, "lr": lr,
                           f"{unit}_per_s": round(rate, 1), "time": round(time.perf_counter() - t_start, 3)})
                    progress.update(bar, completed=step, loss=loss_val, rate=rate_ema)
                else:
                    progress.update(bar, completed=step, rate=rate_ema)

                early = False
                if task.eval_due(step) or step == steps:
                    row, line, early = task.evaluate(step)
                    last_eval, evaluated_at = row, step
                    write({"kind": "eval", "step": step, **row})
                    if dist.master and line:
                        say(line)
                if early:
                    stopped = "early stop"
                    break
                if step < steps and task.checkpoint_due(step):
                    task.checkpoint(step)
        except KeyboardInterrupt:
            stopped = "interrupted"
    return FitResult(step, stopped, steps_this_run, train_time, losses, last_eval, evaluated_at)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (timeout, containers, systemd, Slurm) stops training like Ctrl-C does: a checkpoint
    and a way to resume, not a lost run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def clean_partial_checkpoints(folder: Path) -> None:
    """Remove checkpoint folders a killed write left half-made (`.step_N.tmp-*`, `.step_N.old-*`)."""
    ckpts = folder / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _out_of_time(budget: float | None, t_start: float, dist: DistInfo, device: torch.device) -> bool:
    if budget is None:
        return False
    stop = (time.perf_counter() - t_start) >= budget
    if dist.enabled:  # rank 0 decides, so every rank stops at the same step
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        tdist.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log rows past the checkpoint (they belong to the lost part of the run)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class Trainer:
    def __init__(self, out_dir: Path | str, *, model_config: ModelConfig | None = None,
                 train_config: TrainConfig | None = None, data: list[str] | None = None,
                 tokenizer: str = "char", vocab_size: int = 2048, resume: bool = False,
                 device: str = "auto", show_progress: bool = True, log: Callable[[str], None] | None = None,
                 resume_overrides: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LMForgeError(f"--out {self.out_dir} is a file, not a folder; choose another --out")
        self.dist, self.device = init_distributed(device)
        self.show_progress = show_progress and self.dist.master
        self._log = log or print
        self.resume_from = None
        if resume:
            ckpt = read_checkpoint(self.out_dir)
            if self.dist.master:
                clean_partial_checkpoints(self.out_dir)
            self.resume_from = ckpt
            self.model_config = ckpt.model_config
            saved = ckpt.train_config.to_dict() if ckpt.train_config else {}
            # settings given when resuming (more steps, a time budget, ...) win over the saved ones
            saved.update(resume_overrides or {})
            self.train_config = TrainConfig.from_dict(saved)
            self.data_paths = data or ckpt.meta.get("data") or []
            self.tokenizer_kind = ckpt.meta.get("tokenizer", tokenizer)
        else:
            if (self.out_dir / "latest").exists():
                raise LMForgeError(f"{self.out_dir} already holds a training run; pass --resume to continue it "
                                   f"or choose another --out")
            self.model_config = model_config or ModelConfig()
            self.train_config = train_config or TrainConfig()
            self.data_paths = list(data or [])
            self.tokenizer_kind = tokenizer
        self.vocab_size = vocab_size

    def log(self, msg: str) -> None:
        if self.dist.master:
            self._log(msg)

    # ------------------------------------------------------------------ setup
    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _prepare(self) -> tuple[LMTokenizer, TokenData]:
        corpus = Corpus(self.data_paths)
        tok_path = self.out_dir / "tokenizer.json"
        if self.dist.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                tok = LMTokenizer.load(self.resume_from.tokenizer_path)
            else:
                self.log(f"training a {self.tokenizer_kind} tokenizer on {corpus.describe()} ...")
                tok = LMTokenizer.train(self.tokenizer_kind, corpus.texts(), self.vocab_size)
            atomic_write_text(tok_path, tok.to_str())
            data = prepare_data(self.out_dir / "data", corpus, tok, self.train_config.val_fraction, log=self.log)
        self._barrier()
        if not self.dist.master:
            tok = LMTokenizer.load(tok_path)
            data = prepare_data(self.out_dir / "data", corpus, tok, self.train_config.val_fraction, log=lambda m: None)
        return tok, data

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TokenData, tok: LMTokenizer, dtype: torch.dtype) -> EvalResult:
        """Loss, perplexity and bits per byte on eval_iters fixed validation batches (split over ranks)."""
        cfg, mc = self.train_config, self.model_config
        was_training = model.training
        model.eval()
        acc = Accumulator(tok.token_bytes, self.device)
        for i in range(self.dist.rank, cfg.eval_iters, self.dist.world_size):
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + i)  # same batches at every evaluation
            x, y = data.batch("val", cfg.batch_size, mc.block_size, gen, self.device)
            with autocast(self.device, dtype):
                logits, _ = model(x)
            acc.add(logits, y)
        model.train(was_training)
        return acc.reduce(self.dist.world_size)

    @torch.no_grad()
    def evaluate_all(self, model: nn.Module, data: TokenData, tok: LMTokenizer, dtype: torch.dtype) -> EvalResult:
        """Loss over the whole validation split (its first FULL_EVAL_CAP tokens), in order."""
        val = data.array("val")[:FULL_EVAL_CAP + 1]
        was_training = model.training
        ev = evaluate_windows(model, val, tok.token_bytes, self.model_config.block_size,
                              self.train_config.batch_size, self.device, dtype)
        model.train(was_training)
        return ev

    # ------------------------------------------------------------------ run
    def run(self, stop_after: int | None = None) -> TrainResult:
        created = not self.out_dir.exists()
        try:
            return self._run(stop_after)
        except BaseException:
            # a run that fails before its first checkpoint leaves nothing behind
            if created and self.dist.master and not (self.out_dir / "latest").exists():
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise
        finally:
            destroy_distributed()

    def _run(self, stop_after: int | None) -> TrainResult:
        cfg, dist_info = self.train_config, self.dist
        tok, data = self._prepare()
        mc = self.model_config
        if mc.vocab_size != tok.vocab_size:
            if self.resume_from is not None:
                raise LMForgeError("the checkpoint's tokenizer does not match its model (vocabulary sizes differ)")
            mc = self.model_config = ModelConfig.from_dict({**mc.to_dict(), "vocab_size": tok.vocab_size})
        data.check_fits(mc.block_size)
        dtype = pick_dtype(cfg.precision, self.device)

        # -------- model
        seed_everything(cfg.seed)  # identical initial weights on every rank
        if self.resume_from is not None:
            raw = load_model(self.resume_from, self.device)
        else:
            raw = build_model(mc, self.device)
        raw.train()
        n_params = count_params(raw)
        self.log(f"model: {mc.family}, {human_count(n_params)} parameters "
                 f"({human_count(count_params(raw, exclude_embeddings=True))} excluding embeddings); "
                 f"tokenizer: {tok.kind}, vocab {tok.vocab_size}; data: {human_count(data.n_train)} train / "
                 f"{human_count(data.n_val)} val tokens; device {self.device}, {str(dtype).replace('torch.', '')}, "
                 f"{dist_info.world_size} process(es)")

        # -------- optimizer and resume
        opt = make_optimizer(raw, cfg, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))
        step = 0
        if self.resume_from is not None:
            state = load_optimizer_state(self.resume_from, opt)
            step = int(state["step"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            self.log(f"resumed from {self.resume_from.path} at step {step}")
        model: nn.Module = raw
        if cfg.compile:
            model = torch.compile(model)
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        trainer = self

        class LMTask(Task):
            def batch(self, step: int, micro: int):
                return data.batch("train", cfg.batch_size, mc.block_size, _batch_generator(cfg.seed, step, micro),
                                  trainer.device)

            def loss(self, model: nn.Module, batch) -> torch.Tensor:
                return model(*batch)[1]

            def set_lr(self, opt, progress_step: float) -> float:
                lr = lr_at(progress_step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                return lr

            def eval_due(self, step: int) -> bool:
                return step % cfg.eval_interval == 0

            def evaluate(self, step: int):
                ev = trainer.evaluate(raw, data, tok, dtype)
                return ev.as_dict(), f"step {step}: val loss {ev.loss:.4f}, ppl {ev.perplexity:.2f}, bpb {ev.bpb:.4f}", False

            def checkpoint_due(self, step: int) -> bool:
                return bool(cfg.checkpoint_interval) and step % cfg.checkpoint_interval == 0

            def checkpoint(self, step: int) -> Path:
                return trainer._save(raw, opt, scaler, tok, step)

        metrics_path = self.out_dir / "metrics.jsonl"
        res = fit(model, raw, opt, LMTask(), steps=cfg.steps, start_step=step, accum=cfg.grad_accum,
                  grad_clip=cfg.grad_clip, log_interval=cfg.log_interval, time_budget=cfg.time_budget, seed=cfg.seed,
                  items_per_step=cfg.batch_size * mc.block_size * cfg.grad_accum, unit="tok", scaler=scaler,
                  dist=dist_info, device=self.device, dtype=dtype, metrics_path=metrics_path,
                  show_progress=self.show_progress, log=self.log, stop_after=stop_after)
        step, final_eval = res.step, res.last_eval

        # -------- final save
        if res.evaluated_at != step:
            ev = self.evaluate(raw, data, tok, dtype)
            final_eval = ev.as_dict()
            if dist_info.master:
                append_metrics(metrics_path, {"kind": "eval", "step": step, **final_eval})
        # the evaluations above sample eval_iters batches (the same ones each time, so that they
        # compare across steps); their mean misses the split's by about 0.02 nats in either
        # direction. The final figure scores every validation token, up to a cap.
        if res.stopped != "interrupted":
            full = self.evaluate_all(raw, data, tok, dtype).as_dict("val_all_")
            final_eval = {**final_eval, **full}
            if dist_info.master:
                append_metrics(metrics_path, {"kind": "final", "step": step, **full})
        last_ckpt = self._save(raw, opt, scaler, tok, step, final_eval)
        if dist_info.master:
            from lmforge.train.plot import plot_loss

            plot_loss(metrics_path, self.out_dir / "loss.png", title=f"{mc.family} on {Corpus(self.data_paths).describe()}")
        total_tokens = cfg.batch_size * mc.block_size * cfg.grad_accum * res.steps_this_run
        result = TrainResult(self.out_dir, last_ckpt, step, res.stopped, total_tokens / max(res.train_seconds, 1e-9),
                             res.train_seconds, n_params, final_eval, res.losses)
        if res.stopped == "interrupted":
            raise LMForgeError(f"interrupted at step {step}; checkpoint saved in {last_ckpt}. "
                               f"Continue with: lmforge train --resume --out {self.out_dir}")
        return result

    # ------------------------------------------------------------------ helpers
    def _save(self, raw: nn.Module, opt, scaler, tok: LMTokenizer, step: int,
              final_eval: dict[str, float] | None = None) -> Path:
        ckpt_dir = self.out_dir / "checkpoints" / f"step_{step:07d}"
        if self.dist.master:
            meta = {"data": self.data_paths, "tokenizer": tok.kind, "eval": final_eval or {}}
            if tok.kind == "bpe":  # the size asked for (a small corpus may give fewer tokens)
                meta["vocab_size"] = self.vocab_size
            save_checkpoint(ckpt_dir, raw, step=step, tokenizer_json=tok.to_str(), train_config=self.train_config,
                            meta=meta, optimizer=opt, tokenizer_extra=tok.saved_extra(),
                            trainer_state={"scaler": scaler.state_dict() if scaler.is_enabled() else None})
            write_latest(self.out_dir, ckpt_dir)
            prune_checkpoints(self.out_dir, self.train_config.keep_checkpoints)
        self._barrier()
        return ckpt_dir
