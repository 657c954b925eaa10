"""A Hugging Face / sentence-transformers encoder folder (BertModel: config.json,
model.safetensors, tokenizer.json, optionally sentence_bert_config.json and 1_Pooling/) into
lmforge's BertEncoder, with the pooling and length settings sentence-transformers would use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lmforge.config import EncoderConfig, load_json
from lmforge.errors import LMForgeError
from lmforge.models.bert import BertEncoder
from lmforge.weights.names import HF_BERT, SLOTS, expand

# tensors a BertModel file may carry that mean pooling never uses
_UNUSED = ("pooler.", "embeddings.position_ids", "cls.")


@dataclass
class EncoderSettings:
    pooling: str = "mean"
    max_len: int = 512
    normalize: bool = True


def is_encoder_dir(path: Path | str) -> bool:
    path = Path(path)
    try:
        return path.is_dir() and load_json(path / "config.json").get("model_type") == "bert"
    except LMForgeError:
        return False


def encoder_config(d: dict, path: Path) -> EncoderConfig:
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise LMForgeError(f"{path}: hidden_act {act!r} is not supported (BERT's MLP is exact gelu)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise LMForgeError(f"{path}: only absolute position embeddings are supported")
    try:
        return EncoderConfig(vocab_size=d["vocab_size"], max_len=d["max_position_embeddings"],
                             n_layer=d["num_hidden_layers"], n_embd=d["hidden_size"],
                             n_head=d["num_attention_heads"], mlp_hidden=d["intermediate_size"],
                             type_vocab_size=d.get("type_vocab_size", 2), norm_eps=d.get("layer_norm_eps", 1e-12),
                             pad_id=d.get("pad_token_id") or 0)
    except KeyError as e:
        raise LMForgeError(f"{path}: config.json lacks {e.args[0]!r}") from None


def settings(path: Path, cfg: EncoderConfig) -> EncoderSettings:
    out = EncoderSettings(max_len=cfg.max_len)
    st = path / "sentence_bert_config.json"
    if st.is_file():
        out.max_len = min(cfg.max_len, int(load_json(st).get("max_seq_length", cfg.max_len)))
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file():
        p = load_json(pooling)
        if p.get("pooling_mode_cls_token"):
            out.pooling = "cls"
        elif not p.get("pooling_mode_mean_tokens", True):
            raise LMForgeError(f"{pooling}: only mean or CLS pooling is supported")
    modules = path / "modules.json"
    if modules.is_file():  # sentence-transformers lists a Normalize module when it normalises
        out.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in load_json(modules))
    return out


def load_encoder_dir(path: Path | str, device: torch.device | str = "cpu") -> tuple[BertEncoder, Path, EncoderSettings]:
    path = Path(path)
    d = load_json(path / "config.json")
    if d.get("model_type") != "bert":
        raise LMForgeError(f"{path}: not a BERT-style encoder (model_type {d.get('model_type')!r})")
    cfg = encoder_config(d, path)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise LMForgeError(f"{path}: tokenizer.json is missing")
    wpath = path / "model.safetensors"
    if not wpath.is_file():
        raise LMForgeError(f"{path}: model.safetensors is missing (lmforge never loads pickled .bin weights)")
    table = expand(HF_BERT, cfg.n_layer)
    with torch.device("meta"):
        model = BertEncoder(cfg)
    model.to_empty(device=device)
    params = model.state_dict()
    filled: set[str] = set()
    C = cfg.n_embd
    try:
        with safe_open(str(wpath), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix("bert.")
                if key.startswith(_UNUSED):
                    continue
                if key not in table:
                    raise LMForgeError(f"{wpath}: unexpected tensor {name} for a BERT encoder")
                ours, slot = table[key]
                t = f.get_tensor(name)
                dst = params[ours] if slot is None else params[ours][SLOTS.index(slot) * C:(SLOTS.index(slot) + 1) * C]
                if t.shape != dst.shape:
                    raise LMForgeError(f"{wpath}: {name} has shape {tuple(t.shape)}, config.json implies "
                                       f"{tuple(dst.shape)}")
                dst.copy_(t)  # casts fp16/bf16 files to float32
                filled.add(key)
    except (SafetensorError, OSError) as e:
        raise LMForgeError(f"{wpath} is corrupt or not a safetensors file ({e})") from None
    missing = sorted(set(table) - filled)
    if missing:
        raise LMForgeError(f"{wpath}: tensor(s) missing: {', '.join(missing[:4])}")
    return model.eval(), tok_path, settings(path, cfg)
