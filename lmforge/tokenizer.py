"""Tokenizers: character-level and byte-level BPE behind one interface.

Both are `tokenizers.Tokenizer` objects saved as a standard tokenizer.json:
- char: a WordLevel model whose pre-tokenizer isolates every Unicode character; decoding fuses
  the pieces back without separators. Characters missing from the vocabulary are an error at
  encode time (the id `<unk>` exists only so the library can report them).
- bpe: byte-level BPE trained with the library's trainer; every string round-trips exactly,
  Chinese and emoji included, and documents are separated by `<|endoftext|>`.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import LMForgeError

UNK = "<unk>"
EOT = "<|endoftext|>"
KINDS = ("char", "bpe")


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc). Parsing a large tokenizer.json (Gemma 3's:
    262k tokens, 515k merges) leaves ~190 MB of freed small allocations in the process, which
    the model's weights -- large tensors, mapped apart from the heap -- never reuse."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _bpe_or_error(vocab, merges, **kw) -> Tokenizer:
    """A BPE tokenizer; a vocabulary whose merges name pieces it lacks (a corrupt file) is a
    clear error, not a traceback from the tokenizers library."""
    try:
        return Tokenizer(models.BPE(vocab=vocab, merges=merges, **kw))
    except Exception as e:  # (the library raises a bare Exception)
        raise LMForgeError(f"the GGUF file's vocabulary is inconsistent ({str(e)[:120]}); the file is corrupt") from None


class LMTokenizer:
    """Thin wrapper adding what training and evaluation need: kind, unknown-character
    checks, the document separator and the UTF-8 byte length of every token."""

    def __init__(self, tk: Tokenizer, kind: str | None = None, *, eos_id: int | None = None,
                 bos_id: int | None = None, add_bos: bool = False, chat_template: str | None = None,
                 stop_ids: list[int] | None = None):
        self.tk = tk
        model_type = type(tk.model).__name__
        if kind is None and model_type == "BPE" and getattr(tk.model, "byte_fallback", False):
            kind = "spm"  # SentencePiece-style BPE (U+2581 for spaces, <0xNN> byte pieces)
        self.kind = kind or {"WordLevel": "char", "BPE": "bpe"}.get(model_type, model_type.lower())
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.unk_id = tk.token_to_id(UNK) if self.kind == "char" else None
        # end of text: the pretrained model's EOS when it has one, else our own separator token
        self.eot_id = eos_id if eos_id is not None else tk.token_to_id(EOT)
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.stop_ids = sorted(set(stop_ids or []) | ({self.eot_id} if self.eot_id is not None else set()))
        self._token_bytes: np.ndarray | None = None
        self._token_strings: list[bytes] | None = None

    # ------------------------------------------------------------ pretrained (GGUF)
    @classmethod
    def from_gguf_meta(cls, meta: dict) -> "LMTokenizer":
        """Rebuild a GGUF file's tokenizer as a `tokenizers` object: GPT-2-style byte-level BPE
        (tokenizer model "gpt2") or SentencePiece-style BPE with byte fallback ("llama")."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise LMForgeError("the GGUF file carries no tokenizer vocabulary")
        if model == "llama":
            return cls._spm_from_gguf_meta(meta)
        if model != "gpt2":
            raise LMForgeError(f"unsupported GGUF tokenizer model {model!r} (lmforge reads 'gpt2' byte-level BPE "
                               "and 'llama' SentencePiece vocabularies)")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        vocab = {t: i for i, t in enumerate(tokens)}
        tk = _bpe_or_error(vocab, merges, fuse_unk=False, byte_fallback=False)
        pre = meta.get("tokenizer.ggml.pre", "default")
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre in ("smollm", "starcoder", "refact", "deepseek-coder", "qwen2", "llama3"):
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))  # these split numbers digit by digit
        tk.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
        tk.decoder = decoders.ByteLevel()
        # control tokens (type 3) match as whole units in text, like <|im_start|>
        from tokenizers import AddedToken

        specials = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
        tk.add_special_tokens(specials)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        stop = [i for i, ty in enumerate(types) if ty == 3 and tokens[i] in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")]
        return cls(tk, "bpe", eos_id=eos, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), stop_ids=stop)

    @classmethod
    def _spm_from_gguf_meta(cls, meta: dict) -> "LMTokenizer":
        """SentencePiece BPE (Gemma, LLaMA 1/2) as a `tokenizers` BPE model.

        The file has pieces and scores but no merges. SentencePiece BPE joins, at each step, the
        adjacent pair whose joined piece ranks best, so the merge list is every way of cutting a
        piece into two pieces of the vocabulary, ordered by the joined piece's place in the file.
        (Not by score: Gemma scores its user-defined pieces, such as runs of spaces, -1000, yet
        SentencePiece matches those first.) Spaces become U+2581 before the model
        runs; characters outside the vocabulary fall back to <0xNN> byte pieces."""
        from tokenizers import AddedToken, normalizers

        tokens = list(meta["tokenizer.ggml.tokens"])
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        # runs of spaces are stored with real spaces, but the model sees them after normalisation
        tokens = ["\u2581" * len(t) if t and set(t) == {" "} else t for t in tokens]
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        merges: list[tuple[int, int, str, str]] = []
        for piece, i in vocab.items():
            if types[i] == 6:  # <0xNN> byte pieces are never joined from parts
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((i, -cut, left, right))
        merges.sort()
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None else None
        tk = _bpe_or_error(vocab, [(a, b) for _, _, a, b in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
        steps = [normalizers.Replace(" ", "\u2581")]
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tk.normalizer = normalizers.Sequence(steps) if len(steps) > 1 else steps[0]
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        # control pieces (3) are special; user-defined ones (4: "\n\n", "<table>", tabs) always
        # match whole in the raw text, as SentencePiece matches them before splitting
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, ty in enumerate(types) if ty == 3])
        tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, ty in enumerate(types) if ty == 4 and "\u2581" not in tokens[i]])
        stop = [i for i, ty in enumerate(types) if ty == 3 and tokens[i] in ("<end_of_turn>", "<|eot_id|>")]
        return cls(tk, "spm", eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                   chat_template=meta.get("tokenizer.chat_template"), stop_ids=stop)

    def extra(self) -> dict:
        """What tokenizer.json cannot hold: saved beside it as tokenizer_extra.json."""
        return {"kind": self.kind, "eos_id": self.eot_id, "bos_id": self.bos_id, "add_bos": self.add_bos,
                "chat_template": self.chat_template, "stop_ids": self.stop_ids}

    def saved_extra(self) -> dict | None:
        """extra() when it holds anything tokenizer.json lacks (a chat template, BOS, stop ids)."""
        return self.extra() if self.bos_id is not None or self.chat_template or len(self.stop_ids) > 1 else None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's own chat template (jinja2, sandboxed)."""
        if not self.chat_template:
            raise LMForgeError("this model has no chat template (it is a base model): use generate instead")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise LMForgeError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        tok = self.tk.id_to_token
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=tok(self.bos_id) if self.bos_id is not None else "",
                eos_token=tok(self.eot_id) if self.eot_id is not None else "")
        except TemplateError as e:
            raise LMForgeError(f"cannot render the chat template: {e}") from None

    # ------------------------------------------------------------ training
    @classmethod
    def train(cls, kind: str, texts: Iterable[str], vocab_size: int = 2048) -> "LMTokenizer":
        if kind == "char":
            return cls.train_char(texts)
        if kind == "bpe":
            return cls.train_bpe(texts, vocab_size)
        raise LMForgeError(f"unknown tokenizer {kind!r}; choose char or bpe")

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> "LMTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        if not chars:
            raise LMForgeError("cannot build a character vocabulary from empty text")
        vocab = {UNK: 0}
        for c in sorted(chars):
            vocab[c] = len(vocab)
        tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        # [\s\S] rather than '.': the regex engine's '.' skips newlines
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tk.decoder = decoders.Fuse()
        return cls(tk, "char")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 2048) -> "LMTokenizer":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise LMForgeError(f"a byte-level BPE vocabulary needs at least {len(alphabet) + 1} tokens")
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=alphabet,
                                      show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, "bpe")

    # ------------------------------------------------------------ io
    def save(self, path: Path | str) -> None:
        path = Path(path)
        self.tk.save(str(path))
        if (extra := self.saved_extra()) is not None:
            import json

            (path.parent / "tokenizer_extra.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path | str) -> "LMTokenizer":
        path = Path(path)
        if not path.is_file():
            raise LMForgeError(f"missing tokenizer file: {path}")
        try:
            tk = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise LMForgeError(f"{path} is not a valid tokenizer.json ({e})") from None
        if path.stat().st_size > 8 << 20:
            _return_freed_memory()
        extra_path = path.parent / "tokenizer_extra.json"
        if extra_path.is_file():
            import json

            extra = json.loads(extra_path.read_text(encoding="utf-8"))
            return cls(tk, extra.get("kind"), eos_id=extra.get("eos_id"), bos_id=extra.get("bos_id"),
                       add_bos=extra.get("add_bos", False), chat_template=extra.get("chat_template"),
                       stop_ids=extra.get("stop_ids"))
        return cls(tk)

    def to_str(self) -> str:
        return self.tk.to_str()

    # ------------------------------------------------------------ use
    def encode(self, text: str, *, check: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if check and self.unk_id is not None and self.unk_id in ids:
            missing = sorted({c for c in text if self.tk.token_to_id(c) is None})
            shown = " ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise LMForgeError(f"text contains {len(missing)} character(s) this tokenizer never saw: {shown}")
        return ids

    def encode_batch(self, texts: list[str], *, check: bool = True) -> list[list[int]]:
        out = [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        if check and self.unk_id is not None:
            for text, ids in zip(texts, out):
                if self.unk_id in ids:
                    self.encode(text)  # raises with the characters named
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    @property
    def doc_separator(self) -> list[int]:
        """Ids placed between documents in a training stream."""
        if self.eot_id is not None:
            return [self.eot_id]
        return self.encode("\n\n", check=False) if self.kind == "char" else []

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for special tokens); bits-per-byte divides by these."""
        if self._token_bytes is None:
            nb = np.zeros(self.vocab_size, dtype=np.int64)
            specials = {t.content for t in self.tk.get_added_tokens_decoder().values()}
            for tok, i in self.tk.get_vocab(with_added_tokens=True).items():
                if tok in specials or tok == UNK:
                    continue
                # byte-level BPE tokens are spelt in a 256-symbol alphabet: one symbol per byte;
                # SentencePiece spells a space U+2581 and a fallback byte <0xNN>
                if self.kind == "bpe":
                    nb[i] = len(tok)
                elif self.kind == "spm" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                    nb[i] = 1
                else:
                    nb[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
            self._token_bytes = nb
        return self._token_bytes


    @property
    def special_ids(self) -> list[int]:
        """Ids of control tokens (<|im_start|>, <end_of_turn>, ...): never spelt as text."""
        return sorted(i for i, t in self.tk.get_added_tokens_decoder().items() if t.special)

    def token_byte_strings(self) -> list[bytes]:
        """The bytes each token id stands for (b"" for control tokens and ids past the
        vocabulary): what a grammar matcher needs to know which tokens can continue a text."""
        if self._token_strings is None:
            out = [b""] * self.vocab_size
            special = set(self.special_ids) | ({self.unk_id} if self.unk_id is not None else set())
            to_byte = _byte_level_decoding() if self.kind == "bpe" else None
            for tok, i in self.tk.get_vocab(with_added_tokens=True).items():
                if i in special or i >= self.vocab_size:
                    continue
                if to_byte is not None:  # one symbol per byte; added tokens are spelt as they are
                    out[i] = bytes(to_byte[c] for c in tok) if all(c in to_byte for c in tok) else tok.encode()
                elif self.kind == "spm" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                    out[i] = bytes([int(tok[3:5], 16)])
                else:
                    out[i] = tok.replace("\u2581", " ").encode("utf-8")
            self._token_strings = out
        return self._token_strings


def _byte_level_decoding() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for the code points from 256 up, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + extra)] = b
            extra += 1
    return table


class StreamDecoder:
    """Incremental detokenizer for streaming: returns only newly completed text and holds back
    an incomplete UTF-8 sequence (which decodes to U+FFFD) until its last byte arrives."""

    def __init__(self, tok: LMTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new = text[self.emitted:]
        self.emitted = len(text)
        return new


def iter_chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Split long texts into pieces of about `size` characters at line ends (for the trainer)."""
    for t in texts:
        start = 0
        while start < len(t):
            end = t.find("\n", start + size)
            end = len(t) if end < 0 else end + 1
            yield t[start:end]
            start = end
