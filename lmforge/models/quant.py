"""Weight-only quantized layers for inference.

- Int8Linear: int8 weights per output channel with one bf16 scale each (symmetric, absmax/127).
  On CPU a decoding step's rows run in lmforge's C kernel (kernels.py; float32 activations,
  or int8-rounded ones in the AVX2 build), otherwise in PyTorch's `_weight_int8pack_mm` with
  bf16 ones, reading a quarter of the bytes of a float32 matmul.
- Int4Linear: 4-bit weights in groups of 32 along the input, each group with an fp16 scale and
  offset (w = q * scale + offset): GGUF's 4-bit blocks (Q4_0, Q4_1, Q4_K) carry over without
  re-rounding their integers. Decoding runs in the C kernel; batches in PyTorch's int4 kernel,
  or, on a CPU without bf16 arithmetic, from DEQUANT_ROWS rows through a float32 copy of the
  weights made for the call and BLAS (faster there, and exact in the activations).
- Int8Table: the token table at Q8_0 precision (int8 in groups of 32, an fp16 scale each): the
  input embedding and, tied, the output projection (the C kernel again), so the largest
  matrix of a small model is held once, in a byte per weight.
The weight-only kernels are built for one row (decoding). An Int8Linear given INT_MM_ROWS+ rows
(a prefill, a batch of texts) takes a dense path instead: see Int8Linear.activations (without
bf16 arithmetic, a float32 copy of the weights and BLAS past SLOW_BF16_ROWS). (A
mostly-int8 GGUF model therefore keeps its few 4-bit matrices as int8: see gguf.quantized_state.)
A short prompt into a decoder's KV cache skips these layers' forward altogether: it runs through
the C step (GPT.forward, kernels.prompt_rows).
Activations between layers stay in the model's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from lmforge.models import kernels

GROUP = 32  # int4 group size: GGUF's 4-bit formats use blocks (or sub-blocks) of 32


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 weights and one bf16 scale per row (symmetric absmax)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def int8_groups_of(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) float -> int8 values (rows, cols) and one scale per 32 (rows, cols // 32),
    symmetric absmax: Q8_0's scheme. The scales are kept in fp16, so the values are rounded
    against the fp16 scale itself (a group of tiny weights, whose scale fp16 can only hold
    coarsely, stays accurate to its rounding)."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // GROUP, GROUP)  # (rows, G, 32)
    d = (g.abs().amax(-1) / 127).clamp(min=2 ** -24).half().float()  # (rows, G): exact in fp16
    return torch.round(g / d[..., None]).clamp(-127, 127).to(torch.int8).reshape(rows, cols), d


def int4_pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (out, in) integers 0..15; scale, offset: (out, in // 32) with w = q * scale + offset.
    Returns the CPU kernel's packed weight (out, in // 2) and its (in // 32, out, 2) scales/zeros."""
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    zero = offset + 8 * scale  # the kernel computes (q - 8) * scale + zero
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, out, 2)
    return packed, sz


# From this many rows (a prefill, a batch of texts), CPU linears leave the weight-only kernels,
# which are built for one row: at 200 rows a dense bf16 matmul over weights widened on the fly is
# 3x faster, and the int8 x int8 matmul (VNNI) faster still.
INT_MM_ROWS = 16
# Up to this many rows an Int8Linear runs in the C kernel (float32 activations). At 8 rows a
# 2048-wide input (64 KB of activations) outgrows the L1 cache and PyTorch's kernel is faster.
KERNEL_ROWS = 4
# Up to this many rows, on a CPU without bf16 arithmetic, the C kernel instead of the dense bf16
# path (measured on an AVX2 build, 576 -> 1536: 235 against 1152 us at 16 rows, 506 against
# 1705 at 32, 866 against 3009 at 64)
SLOW_BF16_ROWS = 64
# From this many rows, on a CPU without bf16 arithmetic, a 4-bit layer multiplies by a float32
# copy of its weights made for the call (measured on the AVX2 build, 576 -> 1536: 0.54 against
# 0.56 ms at 32 rows, 0.85 against 1.06 at 64, 2.1 against 3.3 at 200; the copy costs 0.13 ms)
DEQUANT_ROWS = 32


@functools.cache
def bf16_native() -> bool:
    """Whether PyTorch's CPU kernels here do bf16 arithmetic in hardware (AVX-512 BF16 or AMX;
    ATEN_CPU_CAPABILITY=avx2 turns it off, as on an AVX2-only CPU)."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return cap.startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())


ACTIVATIONS = ("bf16", "int8", "int8x2")


def decoding(x: torch.Tensor) -> bool:
    """A decoding step's activations: (B, 1, C), one position per row."""
    return x.dim() == 3 and x.size(1) == 1


def _int8_activations_mm(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, split: bool = True) -> torch.Tensor:
    """x (N, in) float32 @ int8 w (out, in).T with per-row activation scales. With `split`, each
    activation row is written as two int8 parts, x ~ s1 * a1 + s2 * a2 with s2 = s1 / 127 (about
    14 bits), and both parts go through one int8 matmul of 2N rows; without, one int8 part (8
    bits, twice as fast: enough for sentence embeddings, not for a decoder's next-token ranking)."""
    s1 = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # (N, 1)
    a1 = torch.round(x / s1).clamp(-127, 127)
    if not split:
        return torch._int_mm(a1.to(torch.int8), w.t()).float() * s1 * w_scales.float()
    s2 = s1 / 127
    a2 = torch.round((x - a1 * s1) / s2).clamp(-127, 127)
    n = x.size(0)
    acc = torch._int_mm(torch.cat([a1, a2]).to(torch.int8), w.t()).float()  # (2N, out) int32 sums
    return (acc[:n] * s1 + acc[n:] * s2) * w_scales.float()  # (N, out)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # how a CPU batch of INT_MM_ROWS+ rows is multiplied: "bf16" (weights widened to bf16
        # for the call, activations rounded to bf16: floating point, so channels with outliers
        # keep their small neighbours -- a decoder's prefill), "int8" (8-bit per-row
        # activations on the int8 kernel: fastest, for sentence encoders) or "int8x2" (about
        # 14-bit activations as two int8 parts)
        self.activations = "bf16"
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._scales32: torch.Tensor | None = None  # float32 copy of the scales for the C kernel
        self._scales_of: tuple[torch.Tensor, int] | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device)
        q.weight, q.scales = int8_rows(lin.weight.detach())
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        # the C kernel, float32 activations: for a decoding step (one position per row, any number
        # of rows: a row's result never depends on its neighbours), a few rows, or, on a CPU
        # without bf16 arithmetic (AVX2), up to SLOW_BF16_ROWS, where the bf16 copy of the weights
        # below costs about three times as much (a short prompt's prefill, an image's tokens)
        if x.device.type == "cpu" and (decoding(x) or x2.size(0) <= KERNEL_ROWS or (
                self.activations == "bf16" and x2.size(0) <= SLOW_BF16_ROWS and not bf16_native())) \
                and (lib := kernels.usable(x)) is not None:
            y = kernels.q8_matmul(x2, self.weight, None, self._float_scales(), lib=lib)  # (N, out)
        elif x.device.type == "cpu" and x2.size(0) >= INT_MM_ROWS:
            if self.activations == "bf16" and not bf16_native() and x2.dtype == torch.float32:
                # no bf16 arithmetic (AVX2): a float32 copy of the weights for the call and BLAS
                y = torch.mm(x2, self.weight.float().t()) * self._float_scales()
            elif self.activations == "bf16":
                # the per-row weight scales apply to the (N, out) result, cheaper than to the weights
                y = torch.mm(x2.to(torch.bfloat16), self.weight.to(torch.bfloat16).t()) * self.scales
            else:
                y = _int8_activations_mm(x2.float(), self.weight, self.scales, self.activations == "int8x2")
        elif x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)  # (N, out)
        else:
            y = x2.to(torch.bfloat16) @ (self.weight.to(torch.bfloat16) * self.scales[:, None]).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def float_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight these integers stand for."""
        return self.weight.float() * self.scales.float()[:, None]

    def _float_scales(self) -> torch.Tensor:
        key = (self.scales, self.scales._version)  # (re)made when the buffer is replaced or written
        if self._scales_of is None or self._scales_of[0] is not key[0] or self._scales_of[1] != key[1]:
            self._scales32, self._scales_of = self.scales.float().contiguous(), key
        return self._scales32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int4_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) integers 0..15 -> (out, in / 2) bytes in the C kernel's order: within each group
    of 32, byte j holds value j in its low nibble and value j + 16 in its high one (GGUF's
    Q4_0/Q4_1 order)."""
    out_f, in_f = q.shape
    g = q.to(torch.uint8).reshape(out_f, in_f // GROUP, 2, GROUP // 2)  # (out, G, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(out_f, in_f // 2)


def int4_values(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of int4_nibbles: (out, in / 2) bytes -> (out, in) uint8 values 0..15."""
    out_f, half = packed.shape
    g = packed.reshape(out_f, half // 16, 16)  # (out, G, 16)
    return torch.cat([g & 15, g >> 4], dim=-1).reshape(out_f, half * 2)


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32 along the input, each group with an fp16 scale and offset
    (w = q * scale + offset): GGUF's Q4_0/Q4_1 blocks exactly, Q4_K's to fp16 rounding of its
    scales. A decoding step runs in the C kernel (lmf_q4_matmul: half the bytes of int8, float32
    activations); other calls go through PyTorch's int4 kernel over a copy repacked into its
    layout on first use, except many rows on a CPU without bf16 arithmetic (see DEQUANT_ROWS)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        G = in_features // GROUP
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, G, dtype=torch.float16, device=device))
        self.register_buffer("offsets", torch.empty(out_features, G, dtype=torch.float16, device=device))
        self._packed: tuple | None = None  # PyTorch's int4 layout (and the weight it came from), made on first use

    @classmethod
    @torch.no_grad()
    def from_groups(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> "Int4Linear":
        """q: (out, in) integers 0..15; scale, offset: (out, in / 32); w = q * scale + offset."""
        m = cls(q.size(1), q.size(0), device=q.device)
        m.weight, m.scales, m.offsets = int4_nibbles(q), scale.half().contiguous(), offset.half().contiguous()
        return m

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear) -> "Int4Linear":
        out_f, in_f = lin.weight.shape
        g = lin.weight.detach().float().reshape(out_f, in_f // GROUP, GROUP)  # (out, G, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10).half().float()  # rounded against the fp16 scale it keeps
        lo = lo.half().float()
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(out_f, in_f)
        return cls.from_groups(q, scale, lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("int4 weights run on the CPU only; load with quantize='none' or 'int8' on this device")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if (decoding(x) or x2.size(0) <= KERNEL_ROWS) and (lib := kernels.usable(x)) is not None:
            y = kernels.q4_matmul(x2, self.weight, self.scales, self.offsets, lib=lib)  # (N, out)
        elif x2.size(0) >= DEQUANT_ROWS and not bf16_native() and x2.dtype == torch.float32:
            # without bf16 arithmetic (AVX2), PyTorch's int4 kernel reaches about 100 GFLOP/s on
            # a prompt; a float32 copy made for the call and BLAS's matmul, about 180 (and exact
            # float32 activations): 3.3 against 2.1 ms for 200 rows through 576 -> 1536
            w = kernels.q4_dequant(self.weight, self.scales, self.offsets, lib) \
                if (lib := kernels.usable(x)) is not None else self.float_weight()
            y = torch.mm(x2, w.t())  # (N, out)
        else:
            packed, sz = self._torch_packed()
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, GROUP, sz)  # (N, out)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def float_weight(self) -> torch.Tensor:
        """The (out, in) float32 weight these 4-bit groups stand for."""
        G = self.in_features // GROUP
        q = int4_values(self.weight).float().reshape(self.out_features, G, GROUP)  # (out, G, 32)
        w = q * self.scales.float()[..., None] + self.offsets.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def _torch_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None or self._packed[2] is not self.weight:
            # a few hundred rows at a time: whole-matrix int32 temporaries (3.5 MB for 576 x
            # 1536), made for every layer on a model's first prompt, once left the heap grown by
            # 230 MB for SmolLM2 in about one run of eight
            parts = [int4_pack(int4_values(self.weight[i:i + 256]), self.scales[i:i + 256].float(),
                               self.offsets[i:i + 256].float()) for i in range(0, self.out_features, 256)]
            self._packed = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1), self.weight)
        return self._packed[:2]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"


class Int8Table(nn.Module):
    """A token table (V, C) at Q8_0 precision -- int8 values with one fp16 scale per group of 32
    -- that is both the input embedding and, tied, the output projection, so the largest
    matrix of a small model is held once, in a byte per weight. Lookups dequantize just the
    rows they need. The projection runs in the C kernel (kernels.q8_matmul: float32
    activations, one pass over the bytes); without it, in PyTorch's int4 kernel over a copy
    held as two 4-bit halves (q = 16 * hi + lo: two int4 matmuls in one call, exact to the
    group scales, at the cost of that extra copy)."""

    def __init__(self, num: int, dim: int, device=None):
        super().__init__()
        if dim % GROUP:
            raise ValueError(f"the int8 table needs a width divisible by {GROUP}, got {dim}")
        self.num_embeddings, self.embedding_dim = num, dim
        self.register_buffer("weight", torch.empty(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num, dim // GROUP, dtype=torch.float16, device=device))
        self._halves: tuple[torch.Tensor, torch.Tensor, int] | None = None  # the fallback's copy

    @classmethod
    @torch.no_grad()
    def from_int8(cls, q: torch.Tensor, d: torch.Tensor) -> "Int8Table":
        """q: (V, C) int8 values; d: (V, C / 32) scales; w = q * d groupwise."""
        t = cls(*q.shape, device=q.device)
        t.weight, t.scales = q.contiguous(), d.to(torch.float16).contiguous()
        return t

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor) -> "Int8Table":
        return cls.from_int8(*int8_groups_of(w.detach()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: only the requested rows are dequantized. (..., ) -> (..., C)."""
        flat = idx.reshape(-1)
        C = self.embedding_dim
        w = self.weight[flat].float().view(-1, C // GROUP, GROUP) * self.scales[flat].float()[..., None]  # (n, G, 32)
        return w.view(*idx.shape, C)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table.T. (..., C) -> (..., V)."""
        shape = x.shape
        x2 = x.reshape(-1, self.embedding_dim)  # (N, C)
        lib = kernels.usable(x)
        if lib is not None:
            y = kernels.q8_matmul(x2, self.weight, self.scales, lib=lib)  # (N, V)
        elif x.device.type == "cpu":
            packed, sz, padded = self._int4_halves()
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, GROUP, sz)  # (N, 2V')
            y = y[:, :self.num_embeddings].float() + y[:, padded:padded + self.num_embeddings].float()
        else:
            y = torch.cat([x2 @ self.forward(torch.arange(i, min(i + 16384, self.num_embeddings),
                                                         device=x.device)).to(x2.dtype).t()
                           for i in range(0, self.num_embeddings, 16384)], dim=1)  # (N, V), a slice at a time
        return y.to(x.dtype).reshape(*shape[:-1], self.num_embeddings)

    @torch.no_grad()
    def _int4_halves(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The table as the int4 kernel's packed (2V', C / 2) bytes -- rows [0, V') the high
        halves, [V', 2V') the low ones, V' = V rounded up to the packing block -- with its
        (C / 32, 2V', 2) scales and zeros. Built on first use (the no-compiler fallback)."""
        if self._halves is None:
            V, C = self.weight.shape
            padded = -(-V // 64) * 64  # a multiple of every packing block
            parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"hi": [], "lo": []}
            # packed in slices of rows (a multiple of every packing block, so the slices' packed
            # bytes simply concatenate): a 262k-row table as int32 would need gigabytes at once
            for i in range(0, padded, 8192):
                qi = self.weight[i:i + 8192].to(torch.int32)
                di = self.scales[i:i + 8192].float()
                if qi.size(0) < min(8192, padded - i):  # the last slice: pad with zero rows
                    pad = min(8192, padded - i) - qi.size(0)
                    qi, di = torch.cat([qi, qi.new_zeros(pad, C)]), torch.cat([di, di.new_zeros(pad, di.size(1))])
                # q = 16 * (hi - 8) + lo with both halves in 0..15; the kernel computes
                # (u - 8) * scale + zero, so hi gets scale 16d, zero 0 and lo scale d, zero 8d
                parts["hi"].append(int4_pack((qi >> 4) + 8, 16 * di, -128 * di))
                parts["lo"].append(int4_pack(qi & 15, di, torch.zeros_like(di)))
            both = parts["hi"] + parts["lo"]
            self._halves = (torch.cat([w for w, _ in both]), torch.cat([sz for _, sz in both], dim=1), padded)
        return self._halves

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 g{GROUP}"


class TiedHead(nn.Module):
    """The output projection of a tied model: the token table's own `project`. The table is
    held outside the module tree so that it is saved and counted once."""

    def __init__(self, table: Int8Table):
        super().__init__()
        self._table = [table]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._table[0].project(x)


def _is_gpt(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "family", None) == "gpt"


def quantize_model(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Quantize a float model in place. Linears become Int8Linear (or Int4Linear with
    scheme="int4", where the shape allows). A tied GPT's token table becomes an Int8Table
    that also serves as the output projection (CPU only: it runs in the C kernel, or in
    PyTorch's int4 kernel without it)."""
    if _is_gpt(model) and model.config.tie_embeddings and model.embed.weight.device.type == "cpu" \
            and model.config.n_embd % GROUP == 0:
        model.embed = Int8Table.from_float(model.embed.weight)
        model.lm_head = TiedHead(model.embed)
    _quantize_linears(model, scheme)
    if hasattr(model, "invalidate_plan"):
        model.invalidate_plan()
    return model


def _quantize_linears(module: nn.Module, scheme: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            int4 = scheme == "int4" and child.bias is None and child.in_features % GROUP == 0
            setattr(module, name, Int4Linear.from_linear(child) if int4 else Int8Linear.from_linear(child))
        else:
            _quantize_linears(child, scheme)


def quant_layout(model: nn.Module) -> dict[str, str]:
    """Module name -> "int8" / "int4" / "table" / "tied" for every quantized module (saved beside
    the weights, so the quantized model can be rebuilt without its float copy)."""
    kinds = {Int8Linear: "int8", Int4Linear: "int4", Int8Table: "table", TiedHead: "tied"}
    return {name: kinds[type(m)] for name, m in model.named_modules() if type(m) in kinds}


def build_quantized_skeleton(model_cls, cfg, layout: dict[str, str]) -> nn.Module:
    """A quantized model with no storage (meta device) for load_state_dict(assign=True).
    A tied lm_head is left out of the state: call `retie` after loading."""
    with torch.device("meta"):
        model = model_cls(cfg)
        for name, kind in layout.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr)
            if kind == "table":
                new = Int8Table(old.num_embeddings, old.embedding_dim)
            elif kind == "tied":
                continue  # see retie
            elif kind == "int4":
                new = Int4Linear(old.in_features, old.out_features)
            else:
                new = Int8Linear(old.in_features, old.out_features, old.bias is not None)
            setattr(parent, attr, new)
    return model


def retie(model: nn.Module) -> None:
    if _is_gpt(model) and isinstance(model.embed, Int8Table):
        model.lm_head = TiedHead(model.embed)
    if hasattr(model, "invalidate_plan"):
        model.invalidate_plan()
