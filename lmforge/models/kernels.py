"""The C kernels of cpu_kernels.c: built once per machine with the system's C compiler, loaded
with ctypes (no PyTorch headers, so a build takes about a second).

Which build runs is decided here, in one place, from the CPU's features: AVX-512 where the CPU
has it, else AVX2 + FMA + F16C, else plain C. LMFORGE_KERNELS forces one ("avx512", "avx2",
"generic"; the tests use it to check every path the CPU can run) or turns them off ("0"). The
same place (`usable`) decides whether a kernel may run at all for a given call: CPU tensors,
float32, no gradient, not inside torch.compile, no training-mode dropout.

The shared library is cached under $LMFORGE_HOME/kernels, keyed by the source, the build, the
compiler and the CPU, written to a temporary name first (concurrent processes never load half a
file) with its sha256 beside it, and checked against it before it is loaded: a truncated or
damaged library is rebuilt, never mapped (that would end in SIGBUS or SIGSEGV). Without a
compiler, or with the kernels off, `library()` is None and the quantized layers keep to
PyTorch's own kernels, whose bf16 activations move logits by about 1e-3 relative (on AVX2 hosts
PyTorch's int8 kernel can be faster than the plain-C build; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from lmforge.config import home

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_c_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
# build name -> (compiler flags, CPU flags it needs, lmf_isa() it reports)
VARIANTS = {
    "avx512": (["-march=native"], {"avx512f", "avx512bw", "f16c", "fma"}, 2),
    "avx2": (["-march=x86-64-v3", "-mtune=generic"], {"avx2", "fma", "f16c"}, 1),
    "generic": (["-DLMF_GENERIC", "-march=native"], set(), 0),
}
OFF = ("0", "false", "no", "off")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 /proc/cpuinfo names; empty where unknown)."""
    for line in _cpu_id().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def runnable(variant: str) -> bool:
    """Whether this CPU can run the given build."""
    if variant == "generic":
        return True
    return platform.machine().lower() in ("x86_64", "amd64") and VARIANTS[variant][1] <= cpu_flags()


def variants() -> list[str]:
    """The builds this CPU can run, best first."""
    return [v for v in VARIANTS if runnable(v)]


def chosen_variant() -> str | None:
    """The build `library()` loads: LMFORGE_KERNELS when it names one this CPU runs, else the
    best this CPU runs; None when the kernels are off."""
    want = os.environ.get("LMFORGE_KERNELS", "").strip().lower()
    if want in OFF:
        return None
    if want in VARIANTS:
        if runnable(want):
            return want
        warnings.warn(f"lmforge: LMFORGE_KERNELS={want}, but this CPU cannot run that build; using "
                      f"{variants()[0]}", RuntimeWarning, stacklevel=2)
    return variants()[0]


def _compiler() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang") or ""


def _compiler_id(cc: str) -> str:
    """The compiler's path and version line (a compiler upgrade rebuilds the kernels)."""
    try:
        r = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True, timeout=30)
        return cc + (r.stdout.splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError, ValueError):
        return cc


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, variant: str = "avx512", compiler: str | None = None) -> Path:
    """Compile cpu_kernels.c into the shared library `out`, with its sha256 written beside it
    (raises OSError or CalledProcessError)."""
    cc = compiler or _compiler()
    if not cc:
        raise OSError("no C compiler found (install gcc or clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    flags = VARIANTS[variant][0]
    base = [*shlex.split(cc), "-O3", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
    # the best first; then without OpenMP threads (Apple's clang) but still vectorised by its
    # simd hints; then without the architecture flags (compilers that lack them)
    keep = ["-DLMF_GENERIC"] if variant == "generic" else []
    tries = [base + flags + ["-fopenmp"], base + flags + ["-fopenmp-simd"], base + keep + ["-fopenmp"], base + keep]
    try:
        for cmd in tries:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                os.chmod(tmp, 0o755)  # (mkstemp made it private; a shared store serves other users too)
                digest = _sha256(Path(tmp))
                side = Path(tmp + ".sha256")
                side.write_text(digest)
                os.replace(tmp, out)
                os.replace(side, Path(str(out) + ".sha256"))
                return out
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)  # the last try's error
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lmf_q8_matmul.argtypes = [_c_ptr, _i64, _i64, _c_ptr, _c_ptr, _c_ptr, _i64, _c_ptr]
    lib.lmf_q8_matmul.restype = ctypes.c_int
    lib.lmf_q4_matmul.argtypes = [_c_ptr, _i64, _i64, _c_ptr, _c_ptr, _c_ptr, _i64, _c_ptr]
    lib.lmf_q4_matmul.restype = ctypes.c_int
    lib.lmf_q4_dequant.argtypes = [_c_ptr, _c_ptr, _c_ptr, _i64, _i64, _c_ptr]
    lib.lmf_q4_dequant.restype = ctypes.c_int
    lib.lmf_isa.restype = ctypes.c_int
    lib.lmf_prompt_tile.restype = ctypes.c_int
    lib.lmf_rms_norm.argtypes = [_c_ptr, _i64, _i64, _c_ptr, ctypes.c_float, _c_ptr]
    lib.lmf_rms_norm.restype = None
    lib.lmf_attn_decode.argtypes = [_c_ptr, _i64, _c_ptr, _i64, _c_ptr, _i64, _c_ptr, _c_ptr, _i64, _c_ptr, _c_ptr] \
        + [_i64] * 6 + [_c_ptr, _c_ptr, ctypes.c_float, _c_ptr]
    lib.lmf_attn_decode.restype = ctypes.c_int
    lib.lmf_decode_layers.argtypes = [ctypes.POINTER(Model), _i64, _c_ptr, _c_ptr, _c_ptr, _i64, _i64, _c_ptr,
                                      _c_ptr, _c_ptr, _i64]
    lib.lmf_decode_layers.restype = ctypes.c_int
    return lib


class Linear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("w", _c_ptr), ("s", _c_ptr), ("o", _c_ptr),
                ("bias", _c_ptr)]


class Layer(ctypes.Structure):
    _fields_ = [(n, _c_ptr) for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm")] \
        + [(n, Linear) for n in ("qkv", "o", "gate", "up", "down")] \
        + [("cos", _c_ptr), ("sin", _c_ptr), ("rope_len", _i64), ("window", _i64)]


class Model(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("n_layer", "C", "nh", "nkv", "hd", "hidden", "mlp")] \
        + [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.POINTER(Layer))]


def library_path(variant: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + variant.encode() + _compiler_id(_compiler()).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    return home() / "kernels" / f"cpu_kernels-{variant}-{key}{'.dll' if os.name == 'nt' else '.so'}"


def _verified(path: Path) -> bool:
    """The cached library is whole: its bytes hash to the digest written when it was built."""
    try:
        return path.is_file() and Path(str(path) + ".sha256").read_text().strip() == _sha256(path)
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _library(variant: str) -> ctypes.CDLL | None:
    try:
        path = library_path(variant)
        if _verified(path):
            try:
                return load(path)
            except OSError:  # built against another runtime: built again below
                pass
        return load(build(path, variant))
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"lmforge: the C decoding kernels could not be built ({detail.strip()[:300]}); "
                      "decoding falls back to PyTorch's kernels (bf16 activations)", RuntimeWarning, stacklevel=3)
        return None


def library(variant: str | None = None) -> ctypes.CDLL | None:
    """The built kernels (`variant`, or the chosen one), or None (off, no compiler, or the build
    failed: warned once). Never raises."""
    variant = variant or chosen_variant()
    return _library(variant) if variant is not None else None


def usable(x: torch.Tensor, module: torch.nn.Module | None = None, *others: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels for this call, or None where PyTorch's path must run: a tensor off the CPU or
    not float32, an input that needs a gradient (the C code has no backward), inside
    torch.compile (a ctypes call breaks the graph), or a module in training mode with dropout."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()) \
            or torch.compiler.is_compiling():
        return None
    if module is not None and module.training and getattr(module, "dropout", 0):
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in others):
        return None
    return library()


def q8_matmul(x: torch.Tensor, w: torch.Tensor, group_scales: torch.Tensor | None = None,
              row_scales: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) @ W.T as float32 (M, N), W = int8 w (N, K) times its fp16 group scales (N, K / 32)
    and/or float32 row scales (N,). Needs `library()` (or an explicit lib)."""
    lib = lib or library()
    M, K = x.shape
    N = w.size(0)
    if w.dtype != torch.int8 or not w.is_contiguous() or w.shape != (N, K) or w.device.type != "cpu":
        raise ValueError(f"q8_matmul needs contiguous int8 CPU weights of shape ({N}, {K})")
    if group_scales is not None and (group_scales.dtype != torch.float16 or not group_scales.is_contiguous()
                                     or group_scales.shape != (N, K // 32) or group_scales.device.type != "cpu"):
        raise ValueError(f"q8_matmul needs contiguous float16 CPU group scales of shape ({N}, {K // 32})")
    if row_scales is not None and (row_scales.dtype != torch.float32 or not row_scales.is_contiguous()
                                   or row_scales.shape != (N,) or row_scales.device.type != "cpu"):
        raise ValueError(f"q8_matmul needs contiguous float32 CPU row scales of shape ({N},)")
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device="cpu")
    gs = group_scales.data_ptr() if group_scales is not None else None
    rs = row_scales.data_ptr() if row_scales is not None else None
    err = lib.lmf_q8_matmul(x.data_ptr(), M, K, w.data_ptr(), gs, rs, N, y.data_ptr())
    if err == -2:
        raise MemoryError("q8_matmul: out of memory for the rounded activations")
    if err:
        raise ValueError(f"q8_matmul needs K divisible by 32, got {K}")
    return y


def q4_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) @ W.T as float32 (M, N), W 4-bit: w (N, K / 2) uint8 (see lmf_q4_matmul for the
    nibble order) with fp16 scales and offsets (N, K / 32), w = q * scale + offset."""
    lib = lib or library()
    M, K = x.shape
    N = w.size(0)
    _check_q4("q4_matmul", w, scales, offsets, N, K)
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    y = torch.empty(M, N, dtype=torch.float32, device="cpu")
    if lib.lmf_q4_matmul(x.data_ptr(), M, K, w.data_ptr(), scales.data_ptr(), offsets.data_ptr(), N, y.data_ptr()):
        raise MemoryError("q4_matmul: out of memory for the rounded activations")
    return y


def _check_q4(op: str, w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, N: int, K: int) -> None:
    """The C code reads these buffers by the shapes given: a mismatch would read past them."""
    if w.dtype != torch.uint8 or not w.is_contiguous() or w.shape != (N, K // 2) or w.device.type != "cpu" or K % 32:
        raise ValueError(f"{op} needs contiguous uint8 CPU weights of shape ({N}, {K // 2}), K a multiple of 32")
    for t in (scales, offsets):
        if t.dtype != torch.float16 or not t.is_contiguous() or t.shape != (N, K // 32) or t.device.type != "cpu":
            raise ValueError(f"{op} needs contiguous float16 CPU scales and offsets of shape ({N}, {K // 32})")


def q4_dequant(w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The (N, K) float32 matrix of 4-bit weights w (N, K / 2) uint8 with fp16 scales and offsets
    (N, K / 32), as q4_matmul reads them."""
    lib = lib or library()
    N, K = w.size(0), w.size(1) * 2
    _check_q4("q4_dequant", w, scales, offsets, N, K)
    out = torch.empty(N, K, dtype=torch.float32)
    if lib.lmf_q4_dequant(w.data_ptr(), scales.data_ptr(), offsets.data_ptr(), N, K, out.data_ptr()):
        raise ValueError(f"q4_dequant: K={K} is not a multiple of 32")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lib: ctypes.CDLL) -> torch.Tensor:
    """RMSNorm over the last dim of a contiguous float32 CPU tensor, with a float32 weight."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_contiguous() \
            or weight.shape != (x.size(-1),) or x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("rms_norm needs contiguous float32 CPU input and a matching float32 weight")
    y = torch.empty_like(x)
    dim = x.size(-1)
    lib.lmf_rms_norm(x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), eps, y.data_ptr())
    return y


def _rows(t: torch.Tensor, heads: int, hd: int) -> tuple[torch.Tensor, int]:
    """(B, heads, 1, hd) -> float32 CPU rows holding the heads side by side, and the row stride."""
    if t.shape[1:] != (heads, 1, hd):
        raise ValueError(f"attn_decode expects (B, {heads}, 1, {hd}), got {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.float32)
    if t.stride(-1) != 1 or (heads > 1 and t.stride(1) != hd):
        t = t.contiguous()
    return t, t.stride(0)


def attn_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, cache_k: torch.Tensor, cache_v: torch.Tensor,
                slots: torch.Tensor, pos: torch.Tensor, window: int, scale: float,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A decoding step's attention (see lmf_attn_decode): q (B, nh, 1, hd) and the step's new
    k_new/v_new (B, nkv, 1, hd), before RoPE; rope: full-width (cos, signed sin) tables, (1, hd)
    for every row or (B, 1, 1, hd) for each; cache_k/v (S, nkv, max_len, hd) contiguous float32;
    row b writes at position pos[b] of slot slots[b] and attends over its window (0: none)
    ending there. -> (B, nh, 1, hd)."""
    lib = lib or library()
    B, nh, _, hd = q.shape
    S, nkv, max_len = cache_k.size(0), cache_k.size(1), cache_k.size(2)
    for c in (cache_k, cache_v):  # the kernel writes into these: nothing may be off
        if c.dtype != torch.float32 or not c.is_contiguous() or c.device.type != "cpu" or \
                c.shape != (S, nkv, max_len, hd):
            raise ValueError(f"attn_decode needs contiguous float32 CPU caches of shape ({S}, {nkv}, {max_len}, {hd})")
    slots = slots.to(device="cpu", dtype=torch.int64).contiguous()
    pos = pos.to(device="cpu", dtype=torch.int64).contiguous()
    if nkv == 0 or nh % nkv or slots.shape != (B,) or pos.shape != (B,) or window < 0:
        raise ValueError(f"attn_decode: bad heads ({nh} over {nkv}), slots, positions or window for {B} rows")
    if B and (int(slots.min()) < 0 or int(slots.max()) >= S or int(pos.min()) < 0 or int(pos.max()) >= max_len):
        raise ValueError(f"attn_decode: a slot or position outside the cache ({S} slots of {max_len})")
    (q, qs), (k_new, ks), (v_new, vs) = _rows(q, nh, hd), _rows(k_new, nkv, hd), _rows(v_new, nkv, hd)
    cos_p = sin_p = None
    cs = 0
    if rope is not None:
        cos, sin = (r.to(device="cpu", dtype=torch.float32).reshape(-1, hd).contiguous() for r in rope)  # (1 or B, hd)
        if cos.shape != sin.shape or cos.size(0) not in (1, B):
            raise ValueError(f"attn_decode: RoPE tables of shape {tuple(cos.shape)} for {B} rows of width {hd}")
        cs = hd if cos.size(0) > 1 else 0
        cos_p, sin_p = cos.data_ptr(), sin.data_ptr()
    out = torch.empty(B, nh, 1, hd, dtype=torch.float32, device="cpu")
    if lib.lmf_attn_decode(q.data_ptr(), qs, k_new.data_ptr(), ks, v_new.data_ptr(), vs, cos_p, sin_p, cs,
                           cache_k.data_ptr(), cache_v.data_ptr(), B, nh, nkv, max_len, hd, window,
                           slots.data_ptr(), pos.data_ptr(), scale, out.data_ptr()):
        raise MemoryError("attn_decode: out of memory for the attention scores")
    return out


MLP_KINDS = {"swiglu": 0, "geglu": 1, "gelu": 2}


class DecodePlan:
    """A decoder's layers described for lmf_decode_layers: pointers to every weight, so a
    decoding step runs through all layers in one C call. Holds references to the tensors it
    points at (they cannot be freed under it); the model drops the plan when its modules or
    weights are replaced (GPT.invalidate_plan). `build` returns None for what the C step does
    not cover (LayerNorm, a linear that is neither float32, Int8Linear nor Int4Linear, ...)."""

    def __init__(self, model_struct: Model, keep: list, work_per_row: int, rope_len: int, lib: ctypes.CDLL,
                 prefill_rows: int = 0):
        self.struct, self._keep, self.work_per_row, self.rope_len, self.lib = model_struct, keep, work_per_row, \
            rope_len, lib
        # up to this many positions a cached forward (a prompt) runs through the plan too, each
        # position a row: where that beats PyTorch's operators (see prompt_rows)
        self.prefill_rows = prefill_rows

    @classmethod
    def build(cls, model, lib: ctypes.CDLL) -> "DecodePlan | None":
        from lmforge.models.gpt import RMSNorm
        from lmforge.models.quant import Int4Linear, Int8Linear

        cfg = model.config
        keep: list = []
        kinds: set[int] = set()

        def ptr(t: torch.Tensor | None):
            if t is None:
                return None
            if t.device.type != "cpu" or not t.is_contiguous():
                raise _Unsupported
            keep.append(t)
            return t.data_ptr()

        def f32(t):
            if t is not None and t.dtype != torch.float32:
                raise _Unsupported
            return ptr(t)

        def norm(m):
            if m is None:
                return None
            if not isinstance(m, RMSNorm) or m.eps != cfg.norm_eps:
                raise _Unsupported
            return f32(m.weight.detach())

        def linear(m) -> Linear:
            L = _linear(m)
            kinds.add(L.kind)
            return L

        def _linear(m) -> Linear:
            bias = getattr(m, "bias", None)
            if isinstance(m, Int8Linear):
                return Linear(1, m.out_features, m.in_features, ptr(m.weight), ptr(m._float_scales()), None,
                              f32(bias.detach() if bias is not None else None))
            if isinstance(m, Int4Linear):
                return Linear(2, m.out_features, m.in_features, ptr(m.weight), ptr(m.scales), ptr(m.offsets), None)
            if type(m) is torch.nn.Linear:
                return Linear(0, m.out_features, m.in_features, f32(m.weight.detach()), None, None,
                              f32(bias.detach() if bias is not None else None))
            raise _Unsupported

        if cfg.norm != "rmsnorm" or cfg.mlp not in MLP_KINDS or cfg.head_dim > 1024:
            return None
        try:
            layers = (Layer * cfg.n_layer)()
            rope_len = 1 << 62
            for i, blk in enumerate(model.blocks):
                a, mlp = blk.attn, blk.mlp
                L = layers[i]
                L.attn_norm, L.mlp_norm = norm(blk.attn_norm), norm(blk.mlp_norm)
                if a.qk_norm:
                    L.q_norm, L.k_norm = norm(a.q_norm), norm(a.k_norm)
                if blk.post_norms:
                    L.attn_out_norm, L.mlp_out_norm = norm(blk.attn_out_norm), norm(blk.mlp_out_norm)
                L.qkv, L.o, L.up, L.down = linear(a.qkv_proj), linear(a.o_proj), linear(mlp.up_proj), linear(mlp.down_proj)
                if cfg.mlp != "gelu":
                    L.gate = linear(mlp.gate_proj)
                if cfg.pos == "rope":
                    suffix = "_local" if blk.local and model._local_rope else ""
                    cos, sin = getattr(model, f"rope_cos{suffix}"), getattr(model, f"rope_sin{suffix}")
                    L.cos, L.sin = f32(cos), f32(sin)
                    rope_len = min(rope_len, cos.size(0))
                L.window = cfg.sliding_window if blk.local else 0
        except _Unsupported:
            return None
        keep.append(layers)
        m = Model(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden, MLP_KINDS[cfg.mlp],
                  cfg.norm_eps, cfg.head_dim ** -0.5, layers)
        work = 2 * cfg.n_embd + (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim \
            + 2 * cfg.mlp_hidden + max(cfg.n_embd, cfg.mlp_hidden, cfg.n_head * cfg.head_dim)
        return cls(m, keep, work, rope_len if cfg.pos == "rope" else 1 << 62, lib, prompt_rows(lib, kinds))

    def run(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
            pos: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """x (B, C) float32 residual stream, updated in place through every layer and returned;
        cache_k/v (n_layer, S, nkv, max_len, hd); slots, pos: (B,) int64 (checked by the caller:
        slots < S, pos < max_len and pos < rope_len). prefill: the rows are a prompt's positions,
        and int8 layers take the int16 prompt tile; a decoding step leaves it off, so each row's
        result is its own."""
        B = x.size(0)
        work = torch.empty(B * self.work_per_row, dtype=torch.float32)
        if self.lib.lmf_decode_layers(ctypes.byref(self.struct), B, x.data_ptr(), cache_k.data_ptr(),
                                      cache_v.data_ptr(), cache_k.size(1), cache_k.size(3), slots.data_ptr(),
                                      pos.data_ptr(), work.data_ptr(), int(prefill)):
            raise MemoryError("decode step: out of memory for the attention scores")
        return x


def prompt_rows(lib: ctypes.CDLL, kinds: set[int]) -> int:
    """Up to how many positions a prompt goes through the C step rather than PyTorch's
    operators, for a model whose linears are of these kinds (0 float32, 1 int8 with row scales,
    2 4-bit). Measured on SmolLM2-135M, 2 threads (benchmarks/RESULTS.md). Int8 layers take the
    int16-row tile (lmf_prompt_tile): on the AVX2 build faster than PyTorch (whose int8 and
    bf16 matmuls are slow without AVX-512) at every chunk size up to the engine's 256, on
    AVX-512 up to 64 (then PyTorch's bf16 matmul wins); its perplexity is a little lower than
    PyTorch's bf16 activations give. 4-bit layers: the AVX-512 float tile on a few positions
    only; on AVX2 they stay on the module path (float32 copies of the weights and BLAS from
    quant.DEQUANT_ROWS rows, PyTorch's int4 kernel below), which loses less than that build's
    int8-group tile (perplexity +0.3% on SmolLM2). The plain-C build and float32 layers: never."""
    isa = lib.lmf_isa()
    if 0 in kinds or isa == 0:
        return 0
    if 2 in kinds:
        return 8 if isa == 2 else 0
    return (256 if isa == 1 else 64) if lib.lmf_prompt_tile() else 0


class _Unsupported(Exception):
    pass
