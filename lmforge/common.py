"""Runtime helpers shared by every layer: device and precision choice, seeding, the
distributed process group, rank-0 printing and atomic file writes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LMForgeError


def pick_device(name: str = "auto") -> torch.device:
    """auto -> cuda when available, else cpu. An explicit name is validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LMForgeError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError("CUDA was asked for but no CUDA device is available")
    return dev


def cpu_threads() -> int:
    """Threads for CPU inference: $LMFORGE_THREADS if set, else the CPUs this process may run
    on, capped by a container's CPU quota (cgroup v2 cpu.max), which PyTorch's own default
    (the machine's physical cores) ignores -- oversubscribing a quota makes matmuls crawl."""
    env = os.environ.get("LMFORGE_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise LMForgeError(f"LMFORGE_THREADS must be a whole number, got {env!r}") from None
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_cpu_threads() -> int:
    """Apply cpu_threads() to PyTorch's intra-op pool (inference entry points call this)."""
    n = cpu_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast. On CPU fp32 is the default: small models gain nothing from
    bf16 autocast on most CPUs, and fp16 autocast is a CUDA feature."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise LMForgeError("fp16 training needs a CUDA device; use bf16 or fp32 on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), pick_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world), device


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path, progress=None) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; on success it is renamed to `final` (an existing
    `final` is replaced), on failure it is removed. Readers never see a half-written folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_lines(path: Path, skip_blank: bool = False) -> list[str]:
    """The lines of a UTF-8 text file; a missing file or another encoding is a clear error."""
    from lmforge.errors import LMForgeError

    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"no such file: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [ln for ln in lines if ln.strip()] if skip_blank else lines


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
