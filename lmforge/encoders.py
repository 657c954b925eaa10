"""Sentence embeddings with a BERT-style encoder (the API layer for encoders).

    from lmforge.encoders import Encoder
    enc = Encoder.load("minilm-l6")            # after `lmforge pull minilm-l6`
    vecs = enc.embed(["a sentence", "another one"])   # (2, 384) float32, L2-normalised

Texts are sorted by token length and batched so that each batch pads to its own longest text
(not the longest overall), then put back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.common import pick_device, set_cpu_threads
from lmforge.errors import LMForgeError
from lmforge.models.bert import POOLING, BertEncoder
from lmforge.weights.hf_encoder import EncoderSettings, is_encoder_dir, load_encoder_dir

QUANTIZE = ("none", "int8")


class Encoder:
    def __init__(self, model: BertEncoder, tokenizer, settings: EncoderSettings):
        self.model = model.eval()
        self.settings = settings
        self.tk = tokenizer
        self.tk.no_padding()  # the folder's tokenizer.json may pad to a fixed width: batches pad themselves
        self.tk.enable_truncation(settings.max_len)
        self.device = next(model.parameters()).device
        self.quantized: str | None = None
        self.spec = "(unnamed)"  # set by load

    @classmethod
    def load(cls, spec: str | Path, device: str = "auto", quantize: str = "none") -> "Encoder":
        """A pulled encoder's name (`minilm-l6`) or a sentence-transformers / BertModel folder.
        quantize="int8": weight-only int8 linears (on CPU, int8 x int8 matmuls for batches)."""
        if quantize not in QUANTIZE:
            raise LMForgeError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        folder = _resolve(spec)
        from tokenizers import Tokenizer

        dev = pick_device(device)
        if dev.type == "cpu":
            set_cpu_threads()
        model, tok_path, st = load_encoder_dir(folder, dev)
        try:
            tk = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise LMForgeError(f"{tok_path} is not a valid tokenizer.json ({e})") from None
        enc = cls(model, tk, st)
        # what the model is called, for records such as a retrieval collection's: a pulled name
        # as given, a folder as its absolute path
        enc.spec = str(Path(spec).resolve()) if Path(spec).exists() else str(spec)
        if quantize == "int8":
            from lmforge.models.quant import quantize_model

            from lmforge.models.quant import Int8Linear

            quantize_model(enc.model, "int8")
            for name, m in enc.model.named_modules():
                # 8-bit activations (the fastest) everywhere but the attention inputs, where they
                # cost the most accuracy (cosine to float < 0.99 on very short texts; bf16 there
                # measured 0.989 too), which get the two-part ~14-bit form
                if isinstance(m, Int8Linear):
                    m.activations = "int8x2" if name.endswith("qkv_proj") else "int8"
            enc.quantized = "int8"
        return enc

    @property
    def dim(self) -> int:
        return self.model.config.n_embd

    @property
    def pad_id(self) -> int:
        return self.model.config.pad_id

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts))]

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32, normalize: bool | None = None,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(texts), dim) float32 sentence vectors; `progress(n)` is called after each batch."""
        if isinstance(texts, str):
            raise LMForgeError("embed takes a list of texts, not one string")
        if batch_size <= 0:
            raise LMForgeError("batch size must be positive")
        normalize = self.settings.normalize if normalize is None else normalize
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        pool = POOLING[self.settings.pooling]
        pad = self.model.config.pad_id
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = len(ids[rows[0]])  # the longest of this batch (sorted)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            x, mask = x.to(self.device), mask.to(self.device)
            v = pool(self.model(x, mask), mask).float()  # (b, C)
            if normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out[rows] = v.cpu().numpy()
            if progress is not None:
                progress(len(rows))
        return out

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarities (len(a), len(b))."""
        ea, eb = self.embed(a, normalize=True), self.embed(b, normalize=True)
        return ea @ eb.T


class LMBackbone:
    """One of lmforge's own trained language models (a run folder or checkpoint), seen through
    the Encoder interface that classification fine-tuning uses: its final states, pooled over
    real tokens ("mean") or taken at the last one ("last")."""

    def __init__(self, spec: str | Path, device: str = "auto", pooling: str = "last"):
        from lmforge.api import LM
        from lmforge.weights.hf_encoder import EncoderSettings

        if pooling not in ("last", "mean"):
            raise LMForgeError(f"pooling for a language-model backbone must be last or mean, got {pooling!r}")
        lm = LM.load(spec, device=device, quantize="none")
        self.model, self.lm_tokenizer = lm.model, lm.tokenizer
        self.tk = lm.tokenizer.tk
        self.device = lm.device
        limit = lm.config.block_size if lm.config.family == "gpt" else 1 << 30
        self.settings = EncoderSettings(pooling=pooling, max_len=limit, normalize=False)
        self.pad_id = lm.tokenizer.eot_id if lm.tokenizer.eot_id is not None else 0

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            return self.lm_tokenizer.encode_batch(list(texts))
        except LMForgeError as e:
            raise LMForgeError(f"cannot tokenize the data with this model's tokenizer: {e}") from None


DEFAULT_TEMPLATE = "{text}"


def default_layers(n_layer: int) -> list[int]:
    """Every layer from a third to two thirds of the depth: a pretrained decoder's middle layers
    describe a text better than its last ones, which are busy predicting the next token (on
    SST-2, Gemma 3 270M's layer-12 states score 0.89-0.90 with a linear head, its last layer's
    0.87-0.89). They cost one forward pass up to the deepest of them, however many are taken."""
    return list(range(max(1, round(n_layer / 3)), max(1, round(2 * n_layer / 3)) + 1))


class DecoderFeatures:
    """A pretrained decoder (SmolLM2, Gemma 3, any GGUF or Hugging Face decoder) used frozen, as
    a feature extractor for classification: each text, wrapped in a prompt template, is run
    through the model up to its deepest chosen layer, and its features are, at each chosen
    layer, the residual stream averaged over the tokens and the one at the last token (where a
    causal model has read the whole text): 2 x len(layers) x n_embd numbers per text.

    Training only a linear head on these is fast (one forward pass per text, no backward) and, on
    a model this much larger than the small encoders, more accurate than fine-tuning them.
    `states` and `pool` split that pass at the first feature layer, so that the layers above it
    can be trained (classification's --tune) without running the ones below more than once."""

    def __init__(self, spec: str | Path, device: str = "auto", layers: Sequence[int] | None = None,
                 template: str = DEFAULT_TEMPLATE, max_len: int = 256, quantize: str = "auto"):
        from lmforge.api import LM

        if "{text}" not in template:
            raise LMForgeError(f"the prompt template must contain {{text}}, got {template!r}")
        if max_len < 8:
            raise LMForgeError(f"max_len must be at least 8 tokens, got {max_len}")
        self.lm = LM.load(spec, device=device, quantize=quantize)  # float weights ("none") to tune layers
        self.spec = str(Path(spec).resolve()) if Path(spec).exists() else str(spec)
        self.sha256 = _decoder_hash(spec)
        n_layer = self.lm.config.n_layer
        self.layers = sorted(set(layers)) if layers else default_layers(n_layer)
        if not all(1 <= L <= n_layer for L in self.layers):
            raise LMForgeError(f"layers must be between 1 and {n_layer} for this model, got "
                               f"{','.join(map(str, self.layers))}")
        self.template, self.max_len = template, max_len
        self.device = self.lm.device
        pre, post = template.split("{text}", 1)
        self._tail = self.lm.tokenizer.encode(post) if post else []
        if len(self.lm.encode_prompt(pre)) + len(self._tail) >= max_len:
            raise LMForgeError(f"the prompt template alone takes {max_len} tokens or more; give a longer max_len "
                               f"(--max-len) or a shorter template")

    @property
    def dim(self) -> int:
        return 2 * len(self.layers) * self.lm.config.n_embd

    def settings(self) -> dict:
        return {"model": self.spec, "model_sha256": self.sha256, "layers": self.layers, "template": self.template,
                "max_len": self.max_len}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Prompt ids per text; a text too long loses its end, never the template's question."""
        pre, post = self.template.split("{text}", 1)
        out = []
        for t in texts:
            ids = self.lm.encode_prompt(pre + t + post)
            if len(ids) > self.max_len:
                ids = ids[:self.max_len - len(self._tail)] + self._tail
            out.append(ids)
        return out

    @torch.inference_mode()
    def features(self, texts: Sequence[str], batch_size: int = 32,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(len(texts), dim) float32; `progress(n)` is called after each batch of n texts."""
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        n, C = len(self.layers), self.lm.config.n_embd
        out = np.zeros((len(ids), 2 * n * C), dtype=np.float32)
        upto, model = self.layers[-1], self.lm.model
        full = upto >= self.lm.config.n_layer  # the last layer's output: the final normed states
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            x, mask = self._padded([ids[i] for i in rows])
            states = model(x, return_hidden=True, output_hidden_states=True, upto=None if full else upto)[2]
            states = states["hidden_states"]  # (B, T, C) entering each layer 0..upto
            out[rows] = self._pooled(states, mask).cpu().numpy()  # (B, 2 n C)
            if progress is not None:
                progress(len(rows))
        return out

    def _padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) right-padded with 0 and the mask of real tokens (B, T, 1): a causal
        model's real tokens never see the padding after them."""
        width = max(len(r) for r in rows)
        x = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width, 1))
        for r, ids in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
        return x.to(self.device), mask.to(self.device)

    def _pooled(self, states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Features (B, dim) from the states entering each layer (index: layer number)."""
        last = mask[:, :, 0].sum(1).long() - 1  # (B,) each row's last real token
        pick = torch.arange(mask.size(0), device=mask.device)
        feats = []
        for L in self.layers:
            h = states[L].float()  # (B, T, C)
            feats += [(h * mask).sum(1) / mask.sum(1), h[pick, last]]  # 2 x (B, C)
        return torch.cat(feats, -1)  # (B, 2 n C)

    @property
    def first(self) -> int:
        """The first feature layer: what lies below it is never tuned."""
        return self.layers[0]

    @property
    def tunable(self) -> range:
        """The layers between the first feature layer and the last one's input: those `pool`
        runs (and --tune trains); the final norm of a last-layer feature is not among them."""
        return range(self.first, min(self.layers[-1], self.lm.config.n_layer))

    @torch.no_grad()
    def states(self, texts: Sequence[str], batch_size: int = 32,
               progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Per text, the residual stream entering the first feature layer, (T_i, C): the
        input of `pool`, computed once when the layers above are tuned."""
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            x, _ = self._padded([ids[i] for i in rows])
            h = self.lm.model(x, return_hidden=True, output_hidden_states=True, upto=self.first)[2]
            h = h["hidden_states"][self.first].float()  # (B, T, C)
            for r, i in enumerate(rows):
                out[i] = h[r, :len(ids[i])].clone()  # (T_i, C), no view into the batch
            if progress is not None:
                progress(len(rows))
        return out

    def pool(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features (B, dim) of texts from their `states`, through the layers from the first
        feature layer up, with autograd (those layers can be trained through it)."""
        width = max(len(h) for h in states)
        h = torch.zeros((len(states), width, self.lm.config.n_embd), device=self.device)
        mask = torch.zeros((len(states), width, 1), device=self.device)
        for r, s in enumerate(states):
            h[r, :len(s)] = s
            mask[r, :len(s)] = 1
        model = self.lm.model
        run = model.run_layers(h.to(model.norm.weight.dtype), self.first, self.tunable.stop)
        if self.layers[-1] >= self.lm.config.n_layer:  # the last layer's output is taken normed, as features() does
            run[-1] = model.norm(run[-1])
        return self._pooled({L: run[L - self.first] for L in self.layers}, mask)


def _decoder_hash(spec: str | Path) -> str | None:
    """The GGUF's SHA-256 (a pulled model's from its manifest, which the store checks the file
    against), so a head trained on one file's features is never applied to another's."""
    from lmforge.common import sha256_file
    from lmforge.sources import resolve

    src = resolve(spec)
    if src.kind == "store-gguf":
        return src.stored.manifest.get("sha256")
    return sha256_file(src.path) if src.kind == "gguf" else None


def is_pretrained_decoder(spec: str | Path) -> bool:
    """A GGUF file, a pulled GGUF model or a Hugging Face decoder folder (not an lmforge run)."""
    from lmforge.sources import resolve

    return resolve(spec).kind in ("gguf", "store-gguf", "hf")


def load_backbone(spec: str | Path, device: str = "auto", pooling: str | None = None):
    """An Encoder for encoder folders and pulled encoders; an LMBackbone for lmforge runs."""
    path = Path(spec)
    if path.exists() and not is_encoder_dir(path):
        return LMBackbone(path, device, pooling or "last")
    enc = Encoder.load(spec, device=device)
    if pooling is not None:
        if pooling not in ("mean", "cls"):
            raise LMForgeError(f"pooling for an encoder must be mean or cls, got {pooling!r}")
        enc.settings.pooling = pooling
    return enc


def zero_shot(enc: Encoder, texts: Sequence[str], descriptions: dict[str, str]) -> list[dict]:
    """Label each text with the class whose description it is most similar to (no training):
    the baseline a fine-tuned classifier has to beat. Returns label and softmax-ed similarities."""
    if len(descriptions) < 2:
        raise LMForgeError("zero-shot classification needs at least two labels")
    names = list(descriptions)
    sims = enc.similarity(list(texts), [descriptions[n] for n in names])  # (N, L) cosines
    probs = torch.softmax(torch.from_numpy(sims) / 0.05, dim=-1).numpy()  # a sharp softmax over cosines
    return [{"label": names[int(p.argmax())], "probs": dict(zip(names, map(float, p)))} for p in probs]


class ZeroShotClassifier:
    """zero_shot behind the trained classifier's interface (labels, predict, evaluate)."""

    def __init__(self, enc: Encoder, descriptions: dict[str, str]):
        if len(descriptions) < 2:
            raise LMForgeError("zero-shot classification needs at least two labels")
        self.enc, self.descriptions, self.labels = enc, descriptions, list(descriptions)

    @classmethod
    def from_spec(cls, model: str | Path, spec: str, device: str = "auto") -> "ZeroShotClassifier":
        """spec: "pos=a positive review,neg=a negative review", or just "pos,neg"."""
        pairs = [p.split("=", 1) if "=" in p else (p, p) for p in (x.strip() for x in spec.split(",")) if p]
        return cls(Encoder.load(model, device=device), {k.strip(): v.strip() for k, v in pairs})

    def predict(self, texts: Sequence[str]) -> list[dict]:
        return zero_shot(self.enc, texts, self.descriptions)

    def evaluate(self, texts: list[str], labels: list[str]):
        from lmforge.train.classify import evaluate_labels

        return evaluate_labels(self, texts, labels)


def _resolve(spec: str | Path) -> Path:
    """The encoder folder a spec names (see lmforge.sources)."""
    from lmforge.sources import resolve

    src = resolve(spec)
    if src.kind == "encoder":
        return src.path
    if src.kind == "checkpoint" and not Path(spec).exists():
        raise LMForgeError(f"{spec!r} is neither an encoder folder nor a pulled encoder's name")
    if src.kind in ("hf", "checkpoint") and src.stored is None:
        raise LMForgeError(f"{spec} is not an encoder folder (its config.json must say model_type 'bert')")
    raise LMForgeError(f"{spec} is a language model, not an encoder (use lmforge generate/chat for decoder models)")


def embed_file(spec: str | Path, input: str | Path, out: str | Path, batch_size: int = 32, quantize: str = "none",
               normalize: bool | None = None, device: str = "auto",
               progress: Callable[[int, int], None] | None = None) -> tuple[tuple[int, int], float]:
    """Embed every line of a UTF-8 text file into a .npy file (float32, one row per line),
    written whole or not at all. Returns (shape, seconds). progress(done, total) per batch."""
    import io
    import time

    from lmforge.common import atomic_write_bytes, read_lines

    lines = read_lines(Path(input))
    if not lines:
        raise LMForgeError(f"{input} has no lines to embed")
    if Path(out).suffix != ".npy":
        raise LMForgeError(f"--out must end in .npy, got {out}")
    enc = Encoder.load(spec, device=device, quantize=quantize)
    t0 = time.perf_counter()
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(lines))

    vecs = enc.embed(lines, batch_size=batch_size, normalize=normalize, progress=advance)
    buf = io.BytesIO()
    np.save(buf, vecs)
    atomic_write_bytes(Path(out), buf.getvalue())
    return vecs.shape, time.perf_counter() - t0
