"""Text sources (lmforge.corpus) -> tokenizer -> one memory-mapped token file with a
deterministic split.

Files are read in chunks with a strict incremental UTF-8 decoder, so a large corpus streams
through the tokenizer and onto disk without being held in memory; training then samples
windows straight from the memory map. The last `val_fraction` of the token stream is the
validation split (the same rule as nanoGPT's char recipe: a contiguous tail).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.common import atomic_write_text
from lmforge.corpus import Corpus
from lmforge.errors import LMForgeError
from lmforge.tokenizer import LMTokenizer, iter_chunks


# ---------------------------------------------------------------- token file
@dataclass
class TokenData:
    path: Path
    dtype: str
    n_tokens: int
    n_train: int

    @property
    def n_val(self) -> int:
        return self.n_tokens - self.n_train

    def array(self, split: str) -> np.ndarray:
        # a fresh memmap per call: no long-lived mapping keeps pages resident
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return mm[: self.n_train] if split == "train" else mm[self.n_train:]

    def batch(self, split: str, batch_size: int, block_size: int, gen: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and y = x shifted by one (B, T)."""
        data = self.array(split)
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).numpy()  # window i .. i + T
        buf = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)  # (B, T + 1)
        xy = torch.from_numpy(buf)
        x, y = xy[:, :-1], xy[:, 1:]
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous(), y.contiguous()

    def check_fits(self, block_size: int) -> None:
        for split, n in (("train", self.n_train), ("validation", self.n_val)):
            if n < block_size + 1:
                raise LMForgeError(f"not enough text: the {split} split has {n} tokens but one training window "
                                   f"needs {block_size + 1}; give more data or a smaller --block-size")


def tokenize_to_file(tok: LMTokenizer, corpus: Corpus, path: Path) -> int:
    """Stream the corpus through the tokenizer into a flat binary file; returns the token count."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    sep = np.asarray(tok.doc_separator, dtype=dtype)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            wrote_any = False
            for doc in corpus.documents():
                started = False
                pieces: list[str] = []

                def flush() -> None:
                    nonlocal n, started, wrote_any
                    if not pieces:
                        return
                    if wrote_any and not started and len(sep):
                        f.write(sep.tobytes())
                        n += len(sep)
                    started = wrote_any = True
                    for ids in tok.encode_batch(pieces):
                        arr = np.asarray(ids, dtype=dtype)
                        f.write(arr.tobytes())
                        n += len(arr)
                    pieces.clear()

                for piece in iter_chunks(doc):
                    pieces.append(piece)
                    if len(pieces) >= 64:
                        flush()
                flush()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def prepare_data(data_dir: Path, corpus: Corpus, tok: LMTokenizer, val_fraction: float,
                 log=print) -> TokenData:
    """Tokenize the corpus into data_dir (reused when the sources and tokenizer are unchanged)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path, bin_path = data_dir / "meta.json", data_dir / "tokens.bin"
    key = {"sources": corpus.fingerprint(), "tokenizer": hashlib.sha256(tok.to_str().encode()).hexdigest()[:16],
           "val_fraction": val_fraction}
    if meta_path.is_file() and bin_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
        if meta.get("key") == key and bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return TokenData(bin_path, meta["dtype"], meta["n_tokens"], meta["n_train"])
    log(f"tokenizing {corpus.describe()} ...")
    n = tokenize_to_file(tok, corpus, bin_path)
    if n == 0:
        raise LMForgeError(f"the data is empty: {corpus.describe()} contains no text")
    n_train = int(n * (1 - val_fraction))
    dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
    atomic_write_text(meta_path, json.dumps({"key": key, "dtype": dtype, "n_tokens": n, "n_train": n_train}, indent=2))
    return TokenData(bin_path, dtype, n, n_train)
