"""Encoder commands: embed, finetune classify, classify."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli import vision
from lmforge.cli._common import Device, console, parse_duration, parse_int_list, progress, unescape
from lmforge.errors import LMForgeError


def register(app: typer.Typer) -> None:
    app.command()(embed)
    app.command()(classify)
    finetune_app = typer.Typer(help="Fine-tune a pretrained model on your labelled data.", no_args_is_help=True)
    finetune_app.command("classify")(finetune_classify)
    vision.register(app, finetune_app)
    app.add_typer(finetune_app, name="finetune")


def embed(
    model: Annotated[str, typer.Argument(help="A pulled encoder (minilm-l6) or a sentence-transformers folder.")],
    input: Annotated[Path, typer.Option("--in", help="Text file: one sentence per line.")],
    out: Annotated[Path, typer.Option(help="Where to write the embeddings (.npy, float32, one row per line).")],
    batch_size: Annotated[int, typer.Option(help="Sentences per forward pass.")] = 32,
    quantize: Annotated[str, typer.Option(help="none or int8 (int8 x int8 matmuls on CPU: about 1.5x faster).")] = "none",
    normalize: Annotated[Optional[bool], typer.Option(help="L2-normalise (default: as the model's config says).")] = None,
    device: Device = "auto",
):
    """Sentence embeddings for every line of a text file, saved as a NumPy array."""
    from lmforge.encoders import embed_file

    with progress("embed", "sentences", stderr=False) as bar:
        (rows, dim), seconds = embed_file(model, input, out, batch_size, quantize, normalize, device, bar)
    console().print(f"wrote {out}: {rows} x {dim} float32 ({rows / seconds:.0f} sentences/s)", markup=False)


def finetune_classify(
    train: Annotated[Path, typer.Option(help="Labelled rows: .csv, .tsv or .jsonl.")],
    out: Annotated[Path, typer.Option(help="Run folder to create (must not exist or be empty).")],
    model: Annotated[str, typer.Option(help="Backbone: a pulled encoder, a sentence-transformers folder, or an lmforge "
                                            "run/checkpoint (GPT, RNN, GRU, LSTM trained here), all fine-tuned; or a "
                                            "pretrained decoder (gemma3-270m, a .gguf, a Hugging Face folder), kept "
                                            "frozen with a linear head on its middle layers.")] = "minilm-l6",
    pooling: Annotated[Optional[str], typer.Option(help="mean or cls for encoders (default: the model's own); "
                                                        "last (default) or mean for lmforge runs.")] = None,
    text_col: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_col: Annotated[str, typer.Option(help="Column holding the label (strings or integers).")] = "label",
    val: Annotated[Optional[Path], typer.Option(help="Validation rows (default: a stratified split of --train).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of --train held out when no --val is given.")] = 0.1,
    epochs: Annotated[int, typer.Option(help="Passes over the training rows.")] = 2,
    time_budget: Annotated[Optional[str], typer.Option(
        help="Stop after this long (e.g. 25m), the LR schedule following the clock.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Rows per optimizer step (default: 32; 16 with --tune).")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate of the encoder, the head using 1e-3 (default: 5e-5); with --tune of the "
             "decoder's layers, the head using 10x (default: 2e-5).")] = None,
    max_len: Annotated[int, typer.Option(help="Tokens kept per text.")] = 64,
    max_train: Annotated[Optional[int], typer.Option(help="Use a random subsample of this many rows.")] = None,
    eval_every: Annotated[int, typer.Option(help="Steps between validations.")] = 200,
    patience: Annotated[int, typer.Option(help="Validations without improvement before stopping.")] = 4,
    class_weights: Annotated[bool, typer.Option(help="Weight the loss by inverse class frequency.")] = False,
    skip_empty: Annotated[bool, typer.Option(help="Drop rows with an empty text or label instead of stopping.")] = False,
    lora: Annotated[int, typer.Option(help="LoRA rank: train low-rank adapters on a frozen encoder (0: full "
                                           "fine-tuning).")] = 0,
    drop_phrases: Annotated[bool, typer.Option(help="Train on whole texts only: leave out rows that are word spans "
                                                    "of a longer row (SST-2-style phrase rows).")] = False,
    prompt: Annotated[Optional[str], typer.Option(
        help="Pretrained decoders: the template each text is put in, with {text} where it goes, e.g. "
             "'Review: {text}\\nSentiment (positive or negative):' (default: the text alone).")] = None,
    layers: Annotated[Optional[str], typer.Option(
        help="Pretrained decoders: comma-separated layers whose states are the features (default: every "
             "layer from a third to two thirds of the depth).")] = None,
    tune: Annotated[bool, typer.Option(
        help="Pretrained decoders: after fitting the linear head, train the decoder's layers from the first "
             "feature layer up with it (--epochs, --lr, --batch-size apply; several times slower, on SST-2 "
             "slightly more accurate).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same --out from its checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (split, order, dropout).")] = 1337,
    device: Device = "auto",
):
    """Train a classification head (and fine-tune the encoder) on labelled text; keeps the best
    model by validation accuracy and writes metrics.jsonl, confusion.txt/.png and report.json."""
    from lmforge.tasks import classify as tasks

    if not 0 < val_fraction < 0.5:
        raise LMForgeError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    if lora < 0:
        raise LMForgeError(f"--lora must be 0 (off) or a positive rank, got {lora}")
    for name, v in (("epochs", epochs), ("batch-size", batch_size), ("max-len", max_len), ("eval-every", eval_every),
                    ("patience", patience)):
        if v is not None and v <= 0:
            raise LMForgeError(f"--{name} must be positive, got {v}")
    layer_list = parse_int_list(layers, "--layers") if layers is not None else None
    cfg = tasks.make_config(epochs=epochs, batch_size=batch_size, lr=lr, max_len=max_len, val_fraction=val_fraction,
                         eval_every=eval_every, patience=patience, class_weights=class_weights, max_train=max_train,
                         seed=seed, skip_empty=skip_empty, lora_rank=lora, time_budget=parse_duration(time_budget),
                         drop_phrases=drop_phrases, tune=tune)
    con = console()
    report = tasks.finetune(model, train, out, cfg, text_col, label_col, val, resume, pooling, device,
                            log=lambda m: con.print(m, markup=False), prompt=unescape(prompt), layers=layer_list)
    con.print(f"validation: accuracy {report['val_accuracy']:.4f}, macro-F1 {report['val_macro_f1']:.4f} "
              f"({report['val_rows']:,} rows, {report['seconds']:.0f} s); saved to {out}", markup=False)
    con.print((out / "confusion.txt").read_text(encoding="utf-8"), markup=False)


def classify(
    model: Annotated[Path, typer.Argument(
        help="A folder made by lmforge finetune classify; with --zero-shot an encoder; with --labels a decoder.")],
    text: Annotated[Optional[str], typer.Argument(help="Text to label.")] = None,
    input: Annotated[Optional[Path], typer.Option("--in", help="Label every line of this file instead.")] = None,
    eval: Annotated[Optional[Path], typer.Option(help="Score a labelled .csv/.tsv/.jsonl file instead.")] = None,
    zero_shot: Annotated[Optional[str], typer.Option(
        help="No training: MODEL is an encoder and each text gets the label whose description it is closest to; "
             "'pos=a positive review,neg=a negative review' (or just 'pos,neg').")] = None,
    labels: Annotated[Optional[str], typer.Option(
        help="No training: MODEL is a decoder (e.g. smollm2-135m-instruct) that must write one of these "
             "comma-separated labels; each label's probability is the model's.")] = None,
    text_col: Annotated[str, typer.Option(help="With --eval: the text column.")] = "text",
    label_col: Annotated[str, typer.Option(help="With --eval: the label column.")] = "label",
    device: Device = "auto",
):
    """Label text with a fine-tuned classifier: the label and every class's probability."""
    from lmforge.tasks import classify as tasks

    if sum(x is not None for x in (text, input, eval)) != 1:
        raise LMForgeError("give exactly one of: a TEXT argument, --in FILE or --eval FILE")
    if eval is not None:
        s, names, n = tasks.evaluate(model, eval, text_col, label_col, zero_shot, device, labels)
        print(f"accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f} over {n:,} rows")
        print(s.table(names))
        return
    result = tasks.label(model, [text] if text is not None else None, input, zero_shot, device, labels)
    for t, r in zip(result.texts, result.predictions):
        probs = ", ".join(f"{k}: {v:.3f}" for k, v in r["probs"].items())
        print(f"{r['label']}\t{probs}\t{t[:80]}" if input is not None else f"{r['label']}  ({probs})")
