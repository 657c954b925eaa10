"""The C kernels of cpu_kernels.c: built once per machine with the system's C compiler, loaded
with ctypes (no PyTorch headers, so a build takes about a second).

The shared library is cached under $LMFORGE_HOME/kernels, keyed by the source, the compiler and
the CPU, and written to a temporary name first, so concurrent processes never load half a file.
Without a compiler (or with LMFORGE_KERNELS=0) `library()` is None and the quantized layers keep
to PyTorch's own kernels: slower for decoding, and their bf16 activations move logits by about
1e-3 relative.
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


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang") or ""


def _compiler_id(cc: str) -> str:
    """The compiler's path and version line (a compiler upgrade rebuilds the kernels)."""
    try:
        r = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True, timeout=30)
        return cc + (r.stdout.splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError, ValueError):
        return cc


def build(out: Path, generic: bool = False, compiler: str | None = None) -> Path:
    """Compile cpu_kernels.c into the shared library `out` (raises OSError or CalledProcessError).
    generic: leave out the AVX-512 path (the tests check both)."""
    cc = compiler or _compiler()
    if not cc:
        raise OSError("no C compiler found (install gcc or clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    base = [*shlex.split(cc), "-O3", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"] + (["-DLMF_GENERIC"] if generic else [])
    # the best first; without -march=native (some compilers lack it) or OpenMP (Apple's clang) next
    tries = [base + ["-march=native", "-fopenmp"], base + ["-fopenmp"], base + ["-march=native"], base]
    try:
        for cmd in tries:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                os.chmod(tmp, 0o755)  # (mkstemp made it private; a shared store serves other users too)
                os.replace(tmp, out)
                return out
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)  # the last try's error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lmf_q8_matmul.argtypes = [_c_ptr, _i64, _i64, _c_ptr, _c_ptr, _c_ptr, _i64, _c_ptr]
    lib.lmf_q8_matmul.restype = ctypes.c_int
    lib.lmf_q8_avx512.restype = ctypes.c_int
    lib.lmf_rms_norm.argtypes = [_c_ptr, _i64, _i64, _c_ptr, ctypes.c_float, _c_ptr]
    lib.lmf_rms_norm.restype = None
    lib.lmf_attn_decode.argtypes = [_c_ptr, _i64, _c_ptr, _i64, _c_ptr, _i64, _c_ptr, _c_ptr, _i64, _c_ptr, _c_ptr] \
        + [_i64] * 7 + [_c_ptr, ctypes.c_float, _c_ptr]
    lib.lmf_attn_decode.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (disabled, no compiler, or the build failed: warned once)."""
    if os.environ.get("LMFORGE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        cc = _compiler()
        key = hashlib.sha256(SOURCE.read_bytes() + _compiler_id(cc).encode() + _cpu_id().encode()).hexdigest()[:16]
        path = home() / "kernels" / f"cpu_kernels-{key}{'.dll' if os.name == 'nt' else '.so'}"
        if path.is_file():
            try:
                return load(path)
            except OSError:  # damaged, or built against another runtime: built again below
                pass
        return load(build(path))
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"lmforge: the C decoding kernels could not be built ({detail.strip()[:300]}); "
                      "decoding falls back to PyTorch's kernels (slower; bf16 activations)", RuntimeWarning,
                      stacklevel=2)
        return None


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
    if lib.lmf_q8_matmul(x.data_ptr(), M, K, w.data_ptr(), gs, rs, N, y.data_ptr()):
        raise ValueError(f"q8_matmul needs K divisible by 32, got {K}")
    return y


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
                pos: int, start: int, pad: torch.Tensor | None, scale: float, lib: ctypes.CDLL) -> torch.Tensor:
    """A decoding step's attention (see lmf_attn_decode): q (B, nh, 1, hd) and the step's new
    k_new/v_new (B, nkv, 1, hd), before RoPE; rope: full-width (cos, signed sin) tables, (1, hd)
    for every row or (B, 1, 1, hd) for each; cache_k/v (B, nkv, max_len, hd) contiguous float32,
    written at slot pos. Keys [max(start, pad[b]), pos] are attended. -> (B, nh, 1, hd)."""
    B, nh, _, hd = q.shape
    nkv, max_len = cache_k.size(1), cache_k.size(2)
    for c in (cache_k, cache_v):  # the kernel writes into these: nothing may be off
        if c.dtype != torch.float32 or not c.is_contiguous() or c.device.type != "cpu" or \
                c.shape != (B, nkv, max_len, hd):
            raise ValueError(f"attn_decode needs contiguous float32 CPU caches of shape ({B}, {nkv}, {max_len}, {hd})")
    if nkv == 0 or nh % nkv or not 0 <= start <= pos < max_len:
        raise ValueError(f"attn_decode: bad heads ({nh} over {nkv}) or slots (start {start}, pos {pos}, "
                         f"cache {max_len})")
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
    pad_ptr = None
    if pad is not None:
        pad = pad.to(device="cpu", dtype=torch.int64).contiguous()
        if pad.shape != (B,):
            raise ValueError(f"attn_decode: padding for {pad.numel()} rows, not {B}")
        pad_ptr = pad.data_ptr()
    if lib.lmf_attn_decode(q.data_ptr(), qs, k_new.data_ptr(), ks, v_new.data_ptr(), vs, cos_p, sin_p, cs,
                           cache_k.data_ptr(), cache_v.data_ptr(), B, nh, nkv, max_len, hd, start, pos, pad_ptr,
                           scale, out.data_ptr()):
        raise MemoryError("attn_decode: out of memory for the attention scores")
    return out
