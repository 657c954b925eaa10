"""GGUF files (llama.cpp's format) into lmforge's own modules, through the `gguf` package.

The reader memory-maps the file; each tensor is dequantized to float32 with the package's
numpy kernels and placed by the declarative table in `names.py`. llama.cpp's converter
permutes the rows of Q and K so that rotary pairs are interleaved; lmforge (like Hugging Face)
rotates the two halves of each head instead, so those rows are permuted back on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.models import build_model
from lmforge.weights.names import GGUF_GEMMA3, GGUF_LLAMA, SLOTS, expand

# architecture -> (name table, whether llama.cpp interleaved the rotary rows of Q and K)
ARCH_TABLES = {"llama": (GGUF_LLAMA, True), "gemma3": (GGUF_GEMMA3, False)}
SUPPORTED_ARCHS = tuple(ARCH_TABLES)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class GGUFFile:
    path: Path
    arch: str
    meta: dict[str, Any]
    reader: Any

    @property
    def tensors(self):
        return self.reader.tensors


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # a field type this reader cannot decode: not needed by lmforge
        return None


def _open(path: Path):
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LMForgeError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # truncated files surface as ValueError/IndexError/struct errors from numpy views
        raise LMForgeError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    return reader, {key: _field_value(field) for key, field in reader.fields.items()}


def read_gguf_meta(path: str | Path) -> dict[str, Any]:
    """All metadata of a GGUF file, without checking that lmforge can run it."""
    return _open(Path(path))[1]


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file and check that lmforge supports its architecture and tensor types."""
    path = Path(path)
    reader, meta = _open(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LMForgeError(f"{path}: unsupported architecture {arch!r}; lmforge loads {', '.join(SUPPORTED_ARCHS)}")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad:
        raise LMForgeError(f"{path}: unsupported tensor type(s) {', '.join(bad)}; supported: "
                           f"{', '.join(SUPPORTED_TYPES)}")
    align = meta.get("general.alignment") or 32
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise LMForgeError(f"{path}: corrupt GGUF (alignment {align!r} is not a power of two)")
    moved = [t.name for t in reader.tensors if int(t.data_offset) % align]
    if moved:
        raise LMForgeError(f"{path}: corrupt GGUF (tensor data of {', '.join(moved[:3])} off the file's "
                           f"{align}-byte alignment)")
    return GGUFFile(path, arch, meta, reader)


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    m, a = g.meta, g.arch
    names = {t.name for t in g.tensors}

    def need(key: str):
        if f"{a}.{key}" not in m:
            raise LMForgeError(f"{g.path}: metadata {a}.{key} is missing")
        return m[f"{a}.{key}"]

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = m.get(f"{a}.vocab_size") or len(m.get("tokenizer.ggml.tokens") or [])
    if a == "gemma3":
        scaling = m.get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none") and float(m.get(f"{a}.rope.scaling.factor", 1.0)) != 1.0:
            raise LMForgeError(f"{g.path}: RoPE scaling {scaling!r} is not supported yet (Gemma 3 270M has none)")
        return ModelConfig(
            family="gpt", vocab_size=int(vocab), block_size=int(need("context_length")),
            n_layer=int(need("block_count")), n_embd=n_embd, n_head=n_head,
            n_kv_head=int(m.get(f"{a}.attention.head_count_kv", n_head)),
            head_size=int(m.get(f"{a}.attention.key_length", n_embd // n_head)),
            mlp_hidden=int(need("feed_forward_length")), norm="rmsnorm", pos="rope", mlp="geglu", bias=False,
            rope_theta=float(m.get(f"{a}.rope.freq_base", 1e6)),
            norm_eps=float(m.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_embeddings="output.weight" not in names,
            qk_norm=True, post_norms=True, embed_scale=True,
            # llama.cpp and transformers both fix these for Gemma 3 rather than store them:
            # five sliding-window layers (RoPE base 10k) then one global layer
            sliding_window=int(need("attention.sliding_window")), global_every=6, rope_theta_local=10000.0,
        )
    return ModelConfig(
        family="gpt", vocab_size=int(vocab), block_size=int(need("context_length")),
        n_layer=int(need("block_count")), n_embd=n_embd, n_head=n_head,
        n_kv_head=int(m.get(f"{a}.attention.head_count_kv", n_head)),
        mlp_hidden=int(need("feed_forward_length")), norm="rmsnorm", pos="rope", mlp="swiglu", bias=False,
        rope_theta=float(m.get(f"{a}.rope.freq_base", 10000.0)),
        norm_eps=float(m.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
    )


def dequantize(t) -> np.ndarray:
    """One reader tensor -> float32 array in PyTorch's (out, in) orientation."""
    from gguf.quants import dequantize as gg_dequantize

    try:
        arr = gg_dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise LMForgeError(f"cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
    return arr if arr.flags.writeable else arr.copy()  # F32 tensors come back as read-only file views


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary pairs: rows (h, i, 2) -> (h, 2, i)."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _mapped(g: GGUFFile, table: dict[str, tuple[str, str | None]]):
    """(tensor, lmforge name, slot) for every tensor of the file; unknown names are an error."""
    for t in g.tensors:
        if t.name not in table:
            if t.name.startswith("rope_freqs"):  # derived from the config, not needed
                continue
            raise LMForgeError(f"{g.path}: unexpected tensor {t.name} for architecture {g.arch}")
        yield (t, *table[t.name])


def gguf_state_dict(g: GGUFFile, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    names, interleaved = ARCH_TABLES[g.arch]
    table = expand(names, cfg.n_layer)
    state: dict[str, torch.Tensor] = {}
    slots: dict[str, dict[str, np.ndarray]] = {}
    for t, name, slot in _mapped(g, table):
        w = dequantize(t)
        if interleaved and slot in ("q", "k"):
            w = unpermute_rope_rows(w, cfg.n_head if slot == "q" else cfg.n_kv_head)
        if slot is None:
            state[name] = torch.from_numpy(w)
        else:
            slots.setdefault(name, {})[slot] = w
    for name, parts in slots.items():
        if set(parts) != set(SLOTS):
            raise LMForgeError(f"{g.path}: {name} is missing part(s) {set(SLOTS) - set(parts)}")
        state[name] = torch.from_numpy(np.concatenate([parts[s] for s in SLOTS], axis=0))
    return state


FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")


def unpack_4bit(t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1/Q4_K tensor as its own integers and group parameters, without rounding:
    q (rows, cols) in 0..15 and scale, offset (rows, cols // 32), with w = q * scale + offset."""
    kind = t.tensor_type.name
    raw = np.asarray(t.data)
    rows = raw.shape[0]

    def f16(a):
        return a.copy().view(np.float16).astype(np.float32)

    def nibbles(qs):  # (..., 16) bytes -> (..., 32) values: low nibbles first, then high ones
        return np.concatenate([qs & 15, qs >> 4], axis=-1)

    if kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        b = raw.reshape(rows, -1, size)  # (rows, blocks, bytes)
        d = f16(b[..., 0:2])  # (rows, blocks, 1)
        q = nibbles(b[..., size - 16:])  # (rows, blocks, 32)
        offset = -8 * d if kind == "Q4_0" else f16(b[..., 2:4])
        return q.reshape(rows, -1), d[..., 0], offset[..., 0]
    if kind == "Q4_K":
        b = raw.reshape(rows, -1, 144)  # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales, 128 of nibbles
        d, dmin = f16(b[..., 0:2]), f16(b[..., 2:4])  # (rows, nb, 1)
        s = b[..., 4:16].astype(np.int32)  # (rows, nb, 12)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
        qs = b[..., 16:].reshape(rows, -1, 4, 32)  # 4 chunks of 32 bytes: two sub-blocks each
        q = np.stack([qs & 15, qs >> 4], axis=3)  # (rows, nb, 4, 2, 32): sub-blocks in order
        return q.reshape(rows, -1), (d * sc).reshape(rows, -1), (-dmin * mn).reshape(rows, -1)
    raise LMForgeError(f"{t.name}: {kind} is not a 4-bit block format")


def _dequant_rows(t, start: int, stop: int) -> np.ndarray:
    from gguf.quants import dequantize as gg_dequantize

    arr = gg_dequantize(np.asarray(t.data)[start:stop], t.tensor_type)
    return np.array(arr, dtype=np.float32).reshape(stop - start, -1)  # a copy: F32 data is a read-only view


def int8_groups(t, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """A table as int8 values (rows, cols) with one scale per 32 (rows, cols // 32): Q8_0's own
    blocks when the file has them, otherwise re-rounded a slice of rows at a time (a 262k-row
    table in float32 would be 0.7 GB at once)."""
    raw = np.asarray(t.data)
    rows = raw.shape[0]
    if t.tensor_type.name == "Q8_0":
        b = raw.reshape(rows, -1, 34)  # blocks: fp16 scale, then 32 int8 values
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, blocks)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1)
        return torch.from_numpy(q), torch.from_numpy(d)
    from lmforge.models.quant import int8_groups_of

    parts = [int8_groups_of(torch.from_numpy(_dequant_rows(t, i, min(rows, i + chunk))))
             for i in range(0, rows, chunk)]
    return torch.cat([q for q, _ in parts]), torch.cat([d for _, d in parts])


def quantized_state(g: GGUFFile, cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's weights, quantized straight from the file one tensor at a time (the float
    model is never built): 4-bit blocks become int4 groups unchanged (when 4-bit is the
    model's main format), other linears int8 rows, the token table an Int8Table, norms
    float32. Returns (state, layout); the layout names each quantized module's kind, for
    `build_quantized_skeleton`."""
    from lmforge.models.quant import Int8Table, int4_nibbles, int8_rows

    names, interleaved = ARCH_TABLES[g.arch]
    table = expand(names, cfg.n_layer)
    heads = {"q": cfg.n_head, "k": cfg.n_kv_head}
    state: dict[str, torch.Tensor] = {}
    layout: dict[str, str] = {}
    groups: dict[str, dict[str, Any]] = {}  # fused qkv: parts gathered until all three are read
    linears: dict[str, list] = {}
    for t, name, slot in _mapped(g, table):
        if name == "embed.weight":
            tokens = Int8Table.from_int8(*int8_groups(t))
            state["embed.weight"], state["embed.scales"] = tokens.weight, tokens.scales
            layout["embed"] = "table"
        elif len(t.shape) == 1:
            state[name] = torch.from_numpy(dequantize(t))
        elif slot is None:
            linears[name] = [t]
        else:
            groups.setdefault(name, {})[slot] = t
    for name, parts in groups.items():
        if set(parts) != set(SLOTS):
            raise LMForgeError(f"{g.path}: {name} is missing part(s) {set(SLOTS) - set(parts)}")
        linears[name] = [parts[s] for s in SLOTS]
    # A model that is 4-bit in the main (SmolLM2's Q4_1) keeps its 4-bit blocks as int4. One with
    # a few 4-bit matrices among 5- to 8-bit ones (Gemma 3's Q4_K_M: a quarter of its weights)
    # holds those as int8 too: its batches (a prefill) then run every linear as a dense bf16
    # matmul over weights widened on the fly, where the int4 kernel, built for one row, would
    # need a second, dense copy of them to keep up -- more memory than the int8 bytes cost.
    four_bit = {n for n, parts in linears.items() if all(p.tensor_type.name in FOUR_BIT for p in parts)}
    share = sum(int(np.prod(p.shape)) for n in four_bit for p in linears[n]) / \
        max(1, sum(int(np.prod(p.shape)) for parts in linears.values() for p in parts))
    for name, parts in linears.items():
        module = name.rsplit(".", 1)[0]
        slots = SLOTS if len(parts) == 3 else (None,)
        if name in four_bit and share >= 0.5:
            qs, scs, offs = [], [], []
            for p, slot in zip(parts, slots):
                q, sc, off = unpack_4bit(p)
                if interleaved and slot in heads:  # rows move together with their group parameters
                    q, sc, off = (unpermute_rope_rows(a, heads[slot]) for a in (q, sc, off))
                qs.append(q), scs.append(sc), offs.append(off)
            q, sc, off = (torch.from_numpy(np.ascontiguousarray(np.concatenate(a))) for a in (qs, scs, offs))
            state[name] = int4_nibbles(q)
            state[f"{module}.scales"], state[f"{module}.offsets"] = sc.half(), off.half()
            layout[module] = "int4"
        else:
            ws = []
            for p, slot in zip(parts, slots):
                w = dequantize(p)
                if interleaved and slot in heads:
                    w = unpermute_rope_rows(w, heads[slot])
                ws.append(w)
            state[name], state[f"{module}.scales"] = int8_rows(torch.from_numpy(np.concatenate(ws)))
            layout[module] = "int8"
    if "lm_head.weight" not in state:
        layout["lm_head"] = "tied"  # the token table's own projection
    return state, layout


def load_gguf_quantized(g: GGUFFile, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model with quantized weights, never holding a float copy of it (see quantized_state)."""
    from lmforge.weights.quantized import assemble

    cfg = config_from_gguf(g)
    state, layout = quantized_state(g, cfg)
    return assemble(cfg, layout, state, device, source=str(g.path))


def load_gguf_model(g: GGUFFile, device: torch.device | str = "cpu") -> torch.nn.Module:
    cfg = config_from_gguf(g)
    model = build_model(cfg, device=device, init=False)
    state = gguf_state_dict(g, cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LMForgeError(f"{g.path}: tensors missing for {missing[:4]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise LMForgeError(f"{g.path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_buffers()
    return model.eval()


def tokenizer_meta(g: GGUFFile) -> dict[str, Any]:
    """The tokenizer.* metadata as plain Python values (for lmforge.tokenizer)."""
    return {k: v for k, v in g.meta.items() if k.startswith("tokenizer.")}
