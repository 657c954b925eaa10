"""The Python API: everything the CLI (and later the server) does goes through here.

    from lmforge import LM, train
    result = train(out="runs/demo", model="gpt", preset="tiny")
    lm = LM.load("runs/demo")
    print(lm.generate("The ", max_new_tokens=100, seed=0))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.common import pick_device, set_cpu_threads
from lmforge.config import ModelConfig, TrainConfig, preset as get_preset
from lmforge.engine import Engine, Event, Request, SamplingParams
from lmforge.engine.constraint import Constraint, Spec, Vocabulary
from lmforge.engine.sampling import ban_tokens
from lmforge.errors import LMForgeError, TruncatedOutput
from lmforge.tokenizer import LMTokenizer, StreamDecoder
from lmforge.engine.score import EvalResult, evaluate_windows
from lmforge.weights.checkpoint import Checkpoint, load_model, read_checkpoint


QUANTIZE = ("auto", "none", "int8", "int4")
# quantize="auto", by (source kind, on CPU): decoding is memory-bound on a CPU, so pretrained
# weights are quantized there -- a GGUF from its own blocks ("gguf": 4-bit blocks stay 4-bit
# where they are the main format, the rest int8), Hugging Face weights to int8 -- while lmforge's
# own runs, and every model on a GPU, stay float.
QUANTIZE_AUTO = {
    ("gguf", True): "gguf", ("store-gguf", True): "gguf", ("hf", True): "int8", ("checkpoint", True): "none",
    ("gguf", False): "none", ("store-gguf", False): "none", ("hf", False): "none", ("checkpoint", False): "none",
}


class LM:
    """A trained model with its tokenizer, ready to generate and evaluate."""

    def __init__(self, model: torch.nn.Module, tokenizer: LMTokenizer, checkpoint: Checkpoint | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.engine = Engine(self.model)
        self.quantized: str | None = None
        self._vocabulary: Vocabulary | None = None
        self.vision = None
        """A vision run's image encoder + projector (models.vision.VisionTower), or None."""
        self.vision_chat = False
        """The prompt layout the tower was trained with (chat template or plain)."""

    @classmethod
    def load(cls, spec: str | Path, device: str = "auto", quantize: str = "auto", compile: bool = False) -> "LM":
        """A run folder or checkpoint, a pulled model's name, a .gguf file or a Hugging Face
        model folder (config.json + safetensors + tokenizer.json; llama or gpt2).
        quantize: "none" (float weights); "int8" (weight-only int8 linears and token table);
        "int4" (4-bit groups of 32 for the linears, CPU only); or "auto": on CPU, pretrained
        models (GGUF, Hugging Face) are quantized, since decoding is memory-bound there -- a
        GGUF's 4-bit blocks become int4 unchanged (int8 when they are a minority) and its
        other tensors int8 -- and everything else stays float. compile: generation runs
        through torch.compile (see Engine; the first generation waits for the compiler)."""
        if quantize not in QUANTIZE:
            raise LMForgeError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        dev = pick_device(device)
        if dev.type == "cpu":
            set_cpu_threads()
        if quantize == "int4" and dev.type != "cpu":
            raise LMForgeError("int4 weights run on the CPU only; use int8 or none on this device")
        from lmforge.sources import resolve

        src = resolve(spec)
        if src.kind == "vision":  # the decoder it names, and the tower beside it
            from lmforge.models.lora import fold_adapters
            from lmforge.weights.vision import load_adapters, load_vision

            tower, meta = load_vision(src.path, dev)
            adapters = load_adapters(src.path, meta)
            lm = cls.load(meta["lm"], device, quantize, compile and adapters is None)
            if adapters is not None:  # the adapters' updates go into the decoder's weights, in their own format
                try:
                    fold_adapters(lm.model, *adapters)
                except ValueError as e:
                    raise LMForgeError(f"{src.path}: {e} ({meta['lm']})") from None
                if compile:
                    lm.engine = Engine(lm.model, compile=True)
            lm.vision, lm.vision_chat = tower, bool(meta.get("chat"))
            if tower.config.lm_embd != lm.config.n_embd:
                raise LMForgeError(f"{src.path} was trained for a decoder {tower.config.lm_embd} wide, but "
                                   f"{meta['lm']} is {lm.config.n_embd} wide")
            lm._warm_image_prefix()
            return lm
        if src.kind == "encoder":
            raise LMForgeError(f"{spec} is a sentence encoder, not a language model: use lmforge embed "
                               f"(or lmforge.encoders.Encoder)")
        scheme = quantize if quantize != "auto" else QUANTIZE_AUTO[(src.kind, dev.type == "cpu")]
        lm = cls._load(src, dev, scheme)
        if scheme in ("int8", "int4") and not lm.quantized:
            from lmforge.models.quant import quantize_model

            quantize_model(lm.model, scheme)
            lm.quantized = scheme
        if compile:
            lm.engine = Engine(lm.model, compile=True)
        return lm

    @classmethod
    def _load(cls, src, dev, scheme: str) -> "LM":
        """scheme "gguf": quantized straight from the GGUF's own blocks (the store keeps the copy)."""
        if src.kind == "gguf":
            return cls._from_gguf(src.path, dev, quantized=scheme == "gguf")
        if src.kind == "hf":
            return cls._from_hf(src.path, dev)
        if src.kind == "store-gguf":
            return cls._from_store(src.stored, dev, scheme)
        ckpt = read_checkpoint(src.path)
        tok = LMTokenizer.load(ckpt.tokenizer_path)
        if tok.vocab_size != ckpt.model_config.vocab_size:
            raise LMForgeError(f"checkpoint {ckpt.path}: tokenizer has {tok.vocab_size} tokens but the model "
                               f"expects {ckpt.model_config.vocab_size}")
        return cls(load_model(ckpt, dev), tok, ckpt)

    @classmethod
    def _from_store(cls, model, device, scheme: str = "none") -> "LM":
        from lmforge import store
        from lmforge.weights.quantized import load_quantized, save_quantized

        # The GGUF is re-hashed against the manifest before anything is read from it. The files made
        # from it (converted tokenizer, quantized copy) are checked against the hashes recorded when
        # they were made, and made again from the checked GGUF when missing, damaged or edited; a
        # load from them alone does not read (or hash) the GGUF.
        def checked_gguf():
            store.verify(model)
            return model.gguf

        converted = [n for n in ("tokenizer.json", "tokenizer_extra.json") if (model.path / n).is_file()]
        if converted and store.derived_ok(model, converted):
            tok = LMTokenizer.load(model.path / "tokenizer.json")
        else:
            checked_gguf()
            tok = store.cache_tokenizer(model)
        if scheme == "gguf":
            sha = model.manifest["sha256"]
            cached = load_quantized(model.path, sha, device)
            if cached is not None:
                lm = cls(cached, tok, None)
            else:  # first use (or an older cache): convert once, keep the copy in the store
                lm = cls._from_gguf(checked_gguf(), device, tok, quantized=True)
                save_quantized(model.path, lm.model, sha)
            lm.quantized = "gguf"
            return lm
        return cls._from_gguf(checked_gguf(), device, tok)

    @classmethod
    def _from_gguf(cls, path: Path, device, tok: LMTokenizer | None = None, quantized: bool = False) -> "LM":
        """quantized: int4 where the file has 4-bit blocks, int8 elsewhere, straight from the file."""
        from lmforge.weights.gguf import load_gguf_model, load_gguf_quantized, read_gguf, tokenizer_meta

        g = read_gguf(path)
        if tok is None:
            tok = LMTokenizer.from_gguf_meta(tokenizer_meta(g))
        model = load_gguf_quantized(g, device) if quantized else load_gguf_model(g, device)
        if tok.vocab_size > model.config.vocab_size:
            raise LMForgeError(f"{path}: tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
        lm = cls(model, tok, None)
        lm.quantized = "gguf" if quantized else None
        return lm

    @classmethod
    def _from_hf(cls, path: Path, device) -> "LM":
        from lmforge.weights.hf import load_hf_dir, tokenizer_settings

        model, tok_path = load_hf_dir(path, device)
        base = LMTokenizer.load(tok_path)  # the vocabulary; special tokens and template come from the JSON files
        tok = LMTokenizer(base.tk, base.kind, **tokenizer_settings(path, base.tk))
        if tok.vocab_size > model.config.vocab_size:
            raise LMForgeError(f"{path}: tokenizer has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
        return cls(model, tok, None)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids for a prompt; an empty prompt starts a fresh document."""
        tok = self.tokenizer
        bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
        if prompt == "":
            ids = bos or tok.doc_separator
            return ids or [0]
        try:
            ids = bos + tok.encode(prompt)
        except LMForgeError as e:
            raise LMForgeError(f"cannot encode the prompt: {e}") from None
        self._check_length(len(ids))
        return ids

    @property
    def context_limit(self) -> int | None:
        """The most tokens prompt and output may take (see ModelConfig.context_limit)."""
        return self.config.context_limit

    def _check_length(self, n: int) -> None:
        ctx = self.context_limit
        if ctx is not None and n >= ctx:
            raise LMForgeError(f"the prompt has {n} tokens but the model's context is {ctx}; shorten it")

    def stream(self, prompt: str, max_new_tokens: int = 200, *, stop: Sequence[str] = (),
               **sampling: Any) -> Iterator[str]:
        """Yield generated text piece by piece (never splitting a UTF-8 character), ending before
        any of the `stop` strings. Sampling options: temperature, top_k, top_p, min_p,
        repetition_penalty, seed. Bad arguments and unencodable prompts raise here, up front.
        For tokens, log-probabilities and the finish reason, use `events`. With `spec`, output
        that ends before the specification is complete raises TruncatedOutput at the end."""
        return _texts(self.events(prompt, max_new_tokens, stop=stop, **sampling))

    def events(self, prompt: str, max_new_tokens: int = 200, *, stop: Sequence[str] = (), logprobs: bool = False,
               top_logprobs: int = 0, processors: Sequence = (), spec: Spec | None = None,
               images: Sequence | None = None, **sampling: Any) -> Iterator[Event]:
        """Generate from a text prompt as the engine's events: token id, text delta,
        log-probability (and top alternatives) when asked, and on the last one the finish
        reason ("stop", "length", "stop_string", "cancelled") and token usage. With `spec` the
        output follows it; the last event's `complete` tells whether it is a whole instance.
        images (a vision run only): image paths, bytes or uint8 (3, S, S) tensors; the prompt is
        then a question about them, laid out as in training, unless it marks where each image
        goes with "<image>"."""
        if images:
            from lmforge.images import IMAGE_MARK, ids_with_images, question_ids

            ids = ids_with_images(self.tokenizer, prompt, bos=True) if IMAGE_MARK in prompt else \
                question_ids(self.tokenizer, prompt, self.vision_chat, len(images))
        else:
            ids = self.encode_prompt(prompt)
        req = self.request(ids, max_new_tokens, stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                           processors=processors, spec=spec, images=images, **sampling)
        return _run_checked(self.engine, req)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, *, stop: Sequence[str] = (),
             **sampling: Any) -> Iterator[str]:
        """Stream the assistant's reply to a conversation ([{"role": ..., "content": ...}, ...])."""
        return _texts(self.chat_events(messages, max_new_tokens, stop=stop, **sampling))

    def chat_events(self, messages: list[dict], max_new_tokens: int = 256, *, stop: Sequence[str] = (),
                    logprobs: bool = False, top_logprobs: int = 0, processors: Sequence = (),
                    spec: Spec | None = None, images: Sequence | None = None, **sampling: Any) -> Iterator[Event]:
        """The assistant's reply as the engine's events (see `events`). With `spec`, the reply
        follows it, and the model is also told in the conversation what it must produce.
        images (a vision run only): they go where the messages say "<image>", or else before
        the text of the first user message; a conversation without a system message gets
        images.VISION_SYSTEM, as in training."""
        sampling.setdefault("temperature", 0.7)
        if spec is not None:
            messages = describe_spec(messages, spec)
        ids = self.chat_ids(messages, len(images or ()))
        req = self.request(ids, max_new_tokens, stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                           processors=processors, spec=spec, images=images, **sampling)
        return _run_checked(self.engine, req)

    def request(self, ids: list[int], max_new_tokens: int, *, stop: Sequence[str] = (), logprobs: bool = False,
                top_logprobs: int = 0, processors: Sequence = (), spec: Spec | None = None,
                images: Sequence | None = None, **sampling: Any) -> Request:
        """An engine request for prompt ids with this model's stops, banned tokens and streaming
        decoder (for callers that run many requests through `self.engine` at once); with `spec`,
        a fresh constraint matcher of its own. With images, ids hold one models.vision.IMAGE
        placeholder per image, and the request carries the spliced prompt embeddings."""
        params = self._params(max_new_tokens, sampling)
        embeds = None
        if images:
            embeds, ids = self.image_embeds(ids, images)
        if self.context_limit is not None:
            max_new_tokens = max(1, min(max_new_tokens, self.context_limit - len(ids)))
        banned = [self.tokenizer.unk_id] if self.tokenizer.unk_id is not None else []
        procs = ([lambda _ids, logits: ban_tokens(logits, banned)] if banned else []) + list(processors)
        if spec is not None:
            procs.append(self.constraint(spec))
        return Request(ids, max_new_tokens, params, self.tokenizer.stop_ids,
                       [s for s in stop if s], StreamDecoder(self.tokenizer), logprobs, top_logprobs, procs,
                       embeds=embeds)

    def _warm_image_prefix(self) -> None:
        """Compute the text every image question starts with (the system turn up to the first
        image) into an engine slot now, so that the first question after load, like every later
        one, computes only the image and what follows it (prefix reuse); run the tower once."""
        from lmforge.images import question_ids
        from lmforge.models.vision import IMAGE

        ids = question_ids(self.tokenizer, "?", self.vision_chat)
        head = ids[:ids.index(IMAGE)]
        if len(head) > 1:
            list(self.engine.generate(head, 1, SamplingParams(temperature=0.0)))  # greedy: no random draw
        size = self.vision.config.image_size
        with torch.no_grad():  # and one blank image through the tower: its convolutions' first-call setup
            self.vision(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=self.device))

    def image_embeds(self, ids: Sequence[int], images: Sequence) -> tuple[torch.Tensor, list[int]]:
        """(T', C) prompt embeddings and one id per row (see engine.vision.image_prompt): ids with
        IMAGE placeholders, each replaced by one image's vectors (images: paths, bytes or uint8
        (3, S, S) tensors). Checks the count of images and the context before any work."""
        from lmforge.engine.vision import image_prompt
        from lmforge.images import load_image
        from lmforge.models.vision import IMAGE

        if self.vision is None:
            raise LMForgeError("this model takes no images (train a vision run: lmforge finetune vision)")
        marks = sum(1 for i in ids if i == IMAGE)
        if marks != len(images):
            raise LMForgeError(f"the prompt has {marks} place(s) for images but {len(images)} image(s) were given")
        size = self.vision.config.image_size
        pixels = torch.stack([img if isinstance(img, torch.Tensor) else load_image(img, size) for img in images])
        ctx = self.context_limit
        need = len(ids) + len(images) * (self.vision.config.n_tokens + 1)
        if ctx is not None and need >= ctx:
            raise LMForgeError(f"{len(images)} image(s) and the text take {need} positions, over the model's "
                               f"context of {ctx}; give fewer images or a shorter prompt")
        return image_prompt(self.model, self.vision, ids, pixels)

    @staticmethod
    def _params(max_new_tokens: int, sampling: dict[str, Any]) -> SamplingParams:
        from lmforge.config import MAX_NEW_TOKENS

        if max_new_tokens <= 0:
            raise LMForgeError("max new tokens must be positive")
        if max_new_tokens > MAX_NEW_TOKENS:
            raise LMForgeError(f"max new tokens must be at most {MAX_NEW_TOKENS:,}, got {max_new_tokens:,}")
        try:
            return SamplingParams(**sampling)
        except TypeError as e:
            raise LMForgeError(f"unknown sampling option: {e}") from None

    def fit_history(self, messages: list[dict], reserve: int) -> list[dict]:
        """Drop the oldest turns (never a system message, never the last one) until the rendered
        conversation leaves `reserve` tokens of context for the reply."""
        ctx = self.context_limit
        if ctx is None:
            return messages
        msgs = list(messages)
        while True:
            n = len(self.tokenizer.encode(self.tokenizer.render_chat(msgs), check=False))
            if n + reserve <= ctx:
                return msgs
            drop = next((i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"), None)
            if drop is None:
                return msgs  # the last message alone is too long: chat_ids reports it
            del msgs[drop]

    def chat_ids(self, messages: list[dict], n_images: int = 0) -> list[int]:
        """A conversation as prompt ids, ready for the reply. With images, one IMAGE
        placeholder each (see images.chat_ids_with_images; `request` takes the images)."""
        if n_images:
            from lmforge.images import chat_ids_with_images

            if self.vision is None:
                raise LMForgeError("this model takes no images (train a vision run: lmforge finetune vision)")
            return chat_ids_with_images(self.tokenizer, messages, n_images)
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, check=False)
        self._check_length(len(ids))
        return ids

    def generate(self, prompt: str, max_new_tokens: int = 200, *, schema: Any = None, json: bool = False,
                 regex: str | None = None, choices: Sequence[str] | None = None, grammar: str | None = None,
                 **kwargs: Any) -> Any:
        """The generated text. With a specification (at most one of schema, json, regex,
        choices, grammar) the output follows it exactly; a Pydantic model class as the schema
        returns a validated instance of it. Output that ends before the specification is
        complete raises TruncatedOutput."""
        spec = self.spec(schema=schema, json=json, regex=regex, choices=choices, grammar=grammar)
        if spec is None:
            return "".join(self.stream(prompt, max_new_tokens, **kwargs))
        text = "".join(self.stream(prompt, max_new_tokens, spec=spec, **kwargs))
        return _parsed(schema, text)

    # ---- specifications (constrained output) -----------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """This tokenizer as the grammar engine sees it, with the cache of compiled specs."""
        if self._vocabulary is None:
            tok = self.tokenizer
            self._vocabulary = Vocabulary(tok.token_byte_strings(), tok.special_ids, tok.stop_ids,
                                          lambda text: tok.encode(text), self.config.vocab_size)
        return self._vocabulary

    @staticmethod
    def spec(*, schema: Any = None, json: bool = False, regex: str | None = None,
             choices: Sequence[str] | None = None, grammar: str | None = None) -> Spec | None:
        """The Spec for at most one of: a JSON Schema (dict, JSON text, file path or Pydantic
        class), any JSON, a regex, a choice list, a Lark (or GBNF) grammar."""
        given = [n for n, v in (("schema", schema), ("json", json or None), ("regex", regex),
                                ("choices", choices), ("grammar", grammar)) if v is not None]
        if len(given) > 1:
            raise LMForgeError(f"give one specification, not {' and '.join(given)}")
        if schema is not None:
            return Spec.json_schema(schema)
        if json:
            return Spec.any_json()
        if regex is not None:
            return Spec.regex(regex)
        if choices is not None:
            return Spec.choice(list(choices))
        if grammar is not None:
            return Spec.grammar(grammar)
        return None

    def constraint(self, spec: Spec) -> Constraint:
        """A fresh matcher for one request (the compiled spec is cached)."""
        return self.vocabulary.constraint(spec)

    def export(self, out_dir: str | Path, format: str = "hf") -> Path:
        """Write the model in another layout; "hf" is loadable by transformers and vLLM."""
        if format != "hf":
            raise LMForgeError(f"unknown export format {format!r}; supported: hf")
        if self.quantized:
            raise LMForgeError("export needs the float weights: load the model with quantize='none'")
        from lmforge.weights.hf import export_hf

        return export_hf(self.model, self.tokenizer, out_dir)

    def evaluate(self, paths: list[str | Path], batch_size: int = 16, progress=None) -> EvalResult:
        """Loss, perplexity and bits per byte over text files, every token scored once."""
        from lmforge.corpus import Corpus

        corpus = Corpus(paths)
        ids: list[int] = []
        sep = self.tokenizer.doc_separator
        for path, doc in zip(corpus.files, corpus.documents()):
            text = "".join(doc)
            if not text:
                continue
            if ids:
                ids.extend(sep)
            try:
                ids.extend(self.tokenizer.encode(text))
            except LMForgeError as e:
                raise LMForgeError(f"{path}: {e}") from None
        if len(ids) < 2:
            raise LMForgeError("the evaluation data is empty (it needs at least two tokens)")
        import numpy as np

        return evaluate_windows(self.model, np.asarray(ids), self.tokenizer.token_bytes, self.config.block_size,
                                batch_size, self.device, progress=progress)


class Conversation:
    """A chat kept turn by turn: `reply(text)` streams the assistant's answer and remembers both
    turns; the oldest turns are dropped (never the system prompt) when the conversation
    outgrows the context."""

    def __init__(self, lm: LM, system: str | None = None, max_new_tokens: int = 512, images: Sequence | None = None,
                 **sampling: Any):
        if not lm.tokenizer.chat_template:
            raise LMForgeError("this model has no chat template (a base model); use: lmforge generate MODEL \"...\"")
        if images:  # read once, up front: a bad file fails before the first turn
            from lmforge.images import load_image

            if lm.vision is None:
                raise LMForgeError("this model takes no images (train a vision run: lmforge finetune vision)")
            images = [load_image(p, lm.vision.config.image_size) for p in images]
            sampling["images"] = images
        self.lm, self.system, self.max_new_tokens, self.sampling = lm, system, max_new_tokens, sampling
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str) -> Iterator[str]:
        self.history.append({"role": "user", "content": text})
        head = [{"role": "system", "content": self.system}] if self.system else []
        messages = self.lm.fit_history(head + self.history, self.max_new_tokens)
        pieces = []
        try:
            for piece in self.lm.chat(messages, max_new_tokens=self.max_new_tokens, **self.sampling):
                pieces.append(piece)
                yield piece
        except TruncatedOutput:
            self.history.pop()  # (a reply cut short is not part of the conversation)
            raise
        self.history.append({"role": "assistant", "content": "".join(pieces)})


def _texts(events: Iterator[Event]) -> Iterator[str]:
    text = []
    for ev in events:
        if ev.text:
            text.append(ev.text)
            yield ev.text
        if ev.finish_reason is not None and getattr(ev, "complete", None) is False:
            raise TruncatedOutput(f"the output ended ({ev.finish_reason}) before the specification was complete: "
                                  "raise the token limit (max_new_tokens, --max-tokens)", "".join(text))


def _run_checked(engine: Engine, req: Request) -> Iterator[Event]:
    """The request's events; with a constraint, the last one also says whether the output is a
    whole instance of the specification (`complete`)."""
    for ev in engine.run([req]):
        if ev.finish_reason is not None:
            mark_complete(req, ev)
        yield ev


def mark_complete(req: Request, last: Event) -> None:
    """On a constrained request's last event, set whether the output is a whole instance of its
    specification (a stop string cuts the text short of what the matcher saw: never complete)."""
    cons = next((p for p in req.processors if isinstance(p, Constraint)), None)
    if cons is not None:
        last.complete = last.finish_reason in ("stop", "length") and cons.complete


def describe_spec(messages: list[dict], spec: Spec) -> list[dict]:
    """The conversation with the specification described in its system message, so that a chat
    model knows what it is asked for, not only forced into it."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        msgs[0]["content"] = f"{msgs[0]['content']}\n\n{spec.describe()}"
    else:
        msgs.insert(0, {"role": "system", "content": spec.describe()})
    return msgs


def _parsed(schema: Any, text: str) -> Any:
    """A Pydantic class's instance from constrained output (the text otherwise)."""
    if schema is not None and hasattr(schema, "model_validate_json"):
        return schema.model_validate_json(text)
    return text


def run_dir(out: str | Path | None, model: str, tokenizer: str, resume: bool = False) -> Path:
    """The run folder: `out`, or runs/MODEL-TOKENIZER-TIMESTAMP for a new single-process run."""
    import os
    import time

    if out is not None:
        return Path(out)
    if resume:
        raise LMForgeError("--resume needs --out: the run folder to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LMForgeError("pass --out when training with torchrun, so every process uses the same folder")
    return Path("runs") / f"{model}-{tokenizer}-{time.strftime('%Y%m%d-%H%M%S')}"


def sample(checkpoint: str | Path, prompt: str = "The ", max_new_tokens: int = 300, device: str = "auto",
           temperature: float = 0.8, seed: int = 0) -> tuple[str, Iterator[str]]:
    """A sample from a trained model: (the prompt used -- empty when the tokenizer cannot
    encode the one given --, the streamed continuation)."""
    lm = LM.load(checkpoint, device=device)
    try:
        lm.encode_prompt(prompt)
    except LMForgeError:
        prompt = ""
    return prompt, lm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def train(out: str | Path | None, *, model: str | None = None, tokenizer: str | None = None,
          data: list[str] | None = None, preset: str | None = None, vocab_size: int | None = None,
          resume: bool = False, device: str = "auto", show_progress: bool = True, log=print,
          stop_after: int | None = None, model_overrides: dict[str, Any] | None = None,
          train_overrides: dict[str, Any] | None = None):
    """Train (or resume) a language model; returns a TrainResult. Overrides win over the preset.
    out None: a new folder under runs/ (see run_dir). New runs default to model "gpt",
    tokenizer "char", preset "small", vocab_size 2048; a resumed run keeps its own, and an option
    that contradicts it is refused."""
    from lmforge.train.loop import Trainer

    out = run_dir(out, model or "gpt", tokenizer or "char", resume)
    t_over = {k: v for k, v in (train_overrides or {}).items() if v is not None}
    if resume:  # the run's saved configuration, with only the explicit overrides applied
        changed = [k for k, v in (model_overrides or {}).items() if v is not None]
        ckpt = read_checkpoint(out)
        family, kind = ckpt.model_config.family, ckpt.meta.get("tokenizer")
        if model is not None and model != family:
            changed.append("model")
        if tokenizer is not None and kind is not None and tokenizer != kind:
            changed.append("tokenizer")
        if preset is not None:  # a preset contradicts the run when its sizes differ from the saved ones
            sizes, _ = get_preset(preset, family)
            if any(getattr(ckpt.model_config, k) != v for k, v in sizes.items()):
                changed.append("preset")
        if vocab_size is not None and (kind == "char" or vocab_size != ckpt.meta.get("vocab_size", vocab_size)):
            changed.append("vocab_size")  # (bpe only: a char run has no vocabulary size to set)
        if changed:
            raise LMForgeError(f"cannot change the model when resuming ({', '.join(sorted(changed))}); "
                               f"start a new run with another --out instead")
        trainer = Trainer(out, data=data, resume=True, device=device, show_progress=show_progress, log=log,
                          resume_overrides=t_over)
        return trainer.run(stop_after=stop_after)
    m, t = get_preset(preset or "small", model or "gpt")
    m.update({k: v for k, v in (model_overrides or {}).items() if v is not None})
    t.update(t_over)
    trainer = Trainer(out, model_config=ModelConfig(**m), train_config=TrainConfig(**t), data=data,
                      tokenizer=tokenizer or "char", vocab_size=vocab_size or 2048, device=device,
                      show_progress=show_progress, log=log)
    return trainer.run(stop_after=stop_after)
