"""Text sources: files and folders expanded, read as UTF-8 in chunks, or Python's own
documentation when none are given. Shared by training (train.data) and evaluation (api), so
that evaluating a model never loads training code.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import LMForgeError

DEFAULT_CORPUS = "pydoc"  # Python's own documentation: always installed
_CHUNK = 1 << 22


# ---------------------------------------------------------------- sources
def collect_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted, hidden entries and binaries skipped)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise LMForgeError(f"data path does not exist: {p}")
        if p.is_file():
            files.append(p)
            continue
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p).parts
            if f.is_file() and not any(part.startswith(".") for part in rel) and not _looks_binary(f):
                files.append(f)
    if not files:
        raise LMForgeError(f"no text files found in {', '.join(map(str, paths))}")
    return files


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def read_text_chunks(path: Path) -> Iterator[str]:
    """Yield a UTF-8 file as text pieces of a few MB, failing clearly on bad bytes."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(_CHUNK)
                final = not raw
                try:
                    text = dec.decode(raw, final=final)
                except UnicodeDecodeError as e:
                    raise LMForgeError(f"{path} is not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} near "
                                       f"byte {offset + e.start}); convert it to UTF-8 first") from None
                offset += len(raw)
                if text:
                    yield text.replace("\r\n", "\n")
                if final:
                    return
    except OSError as e:
        raise LMForgeError(f"cannot read {path}: {e.strerror}") from None


def pydoc_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


class Corpus:
    """Documents from files/folders, or Python's documentation when no paths are given."""

    def __init__(self, paths: list[str | Path] | None):
        self.paths = [str(p) for p in paths] if paths else []
        self.files = collect_files(self.paths) if self.paths else []
        if self.files and all(f.stat().st_size == 0 for f in self.files):
            raise LMForgeError(f"the data is empty: {', '.join(self.paths)} holds no text")

    def documents(self) -> Iterator[Iterator[str]]:
        """One iterator of text pieces per document."""
        if not self.files:
            for _, text in pydoc_documents():
                yield iter([text])
            return
        for f in self.files:
            yield read_text_chunks(f)

    def texts(self) -> Iterator[str]:
        for doc in self.documents():
            yield from doc

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if not self.files:
            import sys

            h.update(f"pydoc {sys.version_info[:2]}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        if not self.files:
            return "Python's documentation (pydoc_data.topics)"
        return f"{len(self.files)} file(s) from {', '.join(self.paths)}"
