"""Where a model comes from, decided in one place for language models and encoders alike.

A spec is a path or a pulled model's name. `resolve` says which kind it is (and checks a
stored model's files against its manifest); `LM.load` and `Encoder.load` then load that kind.

| spec                                      | kind         |
|-------------------------------------------|--------------|
| a .gguf file                              | gguf         |
| a sentence-transformers / BertModel folder | encoder      |
| a Hugging Face decoder folder             | hf           |
| a vision run (vision.json: a tower + the decoder it names) | vision |
| a store folder (manifest.json) or a pulled name: GGUF | store-gguf |
| ... the same, holding a Hugging Face folder | hf or encoder |
| anything else                             | checkpoint (an lmforge run or checkpoint folder) |

How each kind is quantized by default is the table QUANTIZE_AUTO in api.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LMForgeError


@dataclass
class Source:
    kind: str
    """gguf, hf, encoder, vision, store-gguf, or checkpoint."""
    path: Path
    stored: object | None = None
    """The store.StoredModel for pulled models."""


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LMForgeError(f"{path / 'manifest.json'} is corrupt; pull the model again") from None


def _folder_kind(path: Path) -> str | None:
    from lmforge.weights.hf import is_hf_dir
    from lmforge.weights.hf_encoder import is_encoder_dir

    if is_encoder_dir(path):
        return "encoder"
    if is_hf_dir(path):
        return "hf"
    return None


def _stored(model) -> Source:
    from lmforge import store

    if model.kind == "hf":
        store.verify(model)
        return Source(_folder_kind(model.path) or "hf", model.path, model)
    # a stored GGUF is re-hashed when it is read (LM._from_store); its derived files (quantized
    # copy, converted tokenizer) carry hashes of their own, so a load from them skips the GGUF
    return Source("store-gguf", model.path, model)


def resolve(spec: str | Path) -> Source:
    """The kind of model a spec names (a stored Hugging Face folder verified against its manifest;
    a stored GGUF when it is read)."""
    from lmforge import store

    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Source("gguf", path)
    if path.is_dir():
        if (path / "vision.json").is_file():
            return Source("vision", path)
        kind = _folder_kind(path)
        if kind is not None:
            return Source(kind, path)
        if (path / "manifest.json").is_file():
            return _stored(store.StoredModel(path.name, path, _read_manifest(path)))
    if not path.exists() and isinstance(spec, str) and "/" not in spec and not spec.endswith(".gguf"):
        found = store.find(spec)
        if found is None:
            if spec in store.REGISTRY:
                raise LMForgeError(f"model {spec!r} is not in the local store yet; run: lmforge pull {spec}")
            raise LMForgeError(f"{spec!r} is neither a path nor a known model name (known: {', '.join(store.REGISTRY)})")
        return _stored(found)
    return Source("checkpoint", path)
