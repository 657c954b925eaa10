"""The Hugging Face layout (config.json + *.safetensors + tokenizer files), both ways: export
writes what transformers' AutoModelForCausalLM and vLLM load directly, and the loader reads such
a folder (ours or a hub download, single-file or sharded) into lmforge's own GPT.

LLaMA-style models (RMSNorm, RoPE, SwiGLU) are LlamaForCausalLM; Gemma-3-style ones (QK-norm,
post norms, GeGLU, sliding-window layers) Gemma3ForCausalLM; GPT-2-style ones (LayerNorm,
learned positions, GELU) are GPT2LMHeadModel, whose Conv1D layers store weights transposed
and always carry biases (written as zeros when lmforge's model has none).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.common import atomic_dir
from lmforge.config import ModelConfig, load_json
from lmforge.errors import LMForgeError
from lmforge.models import build_model
from lmforge.weights.checkpoint import FORMAT
from lmforge.weights.names import HF_GEMMA3, HF_LLAMA, expand

# model_type -> the transformers class it names
SUPPORTED = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "gemma3_text": "Gemma3ForCausalLM"}

CONV1D = "conv1d"  # the slot of a GPT-2 weight stored as (in, out)

# Hugging Face GPT2LMHeadModel names, in the declarative form of names.py
HF_GPT2: dict[str, str | tuple[str, str]] = {
    "transformer.wte.weight": "embed.weight",
    "transformer.wpe.weight": "pos_embed.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
    "transformer.h.{i}.ln_1.weight": "blocks.{i}.attn_norm.weight",
    "transformer.h.{i}.ln_1.bias": "blocks.{i}.attn_norm.bias",
    "transformer.h.{i}.ln_2.weight": "blocks.{i}.mlp_norm.weight",
    "transformer.h.{i}.ln_2.bias": "blocks.{i}.mlp_norm.bias",
    "transformer.h.{i}.attn.c_attn.weight": ("blocks.{i}.attn.qkv_proj.weight", CONV1D),
    "transformer.h.{i}.attn.c_attn.bias": "blocks.{i}.attn.qkv_proj.bias",
    "transformer.h.{i}.attn.c_proj.weight": ("blocks.{i}.attn.o_proj.weight", CONV1D),
    "transformer.h.{i}.attn.c_proj.bias": "blocks.{i}.attn.o_proj.bias",
    "transformer.h.{i}.mlp.c_fc.weight": ("blocks.{i}.mlp.up_proj.weight", CONV1D),
    "transformer.h.{i}.mlp.c_fc.bias": "blocks.{i}.mlp.up_proj.bias",
    "transformer.h.{i}.mlp.c_proj.weight": ("blocks.{i}.mlp.down_proj.weight", CONV1D),
    "transformer.h.{i}.mlp.c_proj.bias": "blocks.{i}.mlp.down_proj.bias",
}

# derived buffers some checkpoints carry (GPT-2's causal mask, old LLaMA rotary frequencies)
_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

# chat-turn terminators that stop generation even when they are not the EOS (as for GGUF)
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def _layout(cfg) -> str:
    if cfg.family != "gpt":
        raise LMForgeError(f"only Transformer models export to the Hugging Face layout (this is a {cfg.family})")
    gemma = (cfg.qk_norm, cfg.post_norms, cfg.embed_scale, cfg.mlp, cfg.norm, cfg.pos, cfg.bias)
    if gemma == (True, True, True, "geglu", "rmsnorm", "rope", False):
        return "gemma3"
    if cfg.qk_norm or cfg.post_norms or cfg.embed_scale or cfg.sliding_window is not None:
        raise LMForgeError("this model mixes Gemma 3 features with others; transformers has no matching architecture")
    if cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu" and not cfg.bias:
        return "llama"
    if cfg.norm == "layernorm" and cfg.pos == "learned" and cfg.mlp == "gelu" and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    raise LMForgeError("this model mixes GPT-2 and LLaMA features; transformers has no matching architecture")


def _qkv_rows(cfg) -> dict[str, tuple[int, int]]:
    """Rows of the fused qkv_proj that the separate q, k and v projections occupy."""
    nq, nk = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return {"q": (0, nq), "k": (nq, nq + nk), "v": (nq + nk, nq + 2 * nk)}


# ---------------------------------------------------------------- export
def _table_tensors(model: nn.Module, table, norm_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """Foreign name -> tensor by a names.py table: q/k/v cut from the fused projection, a tied
    lm_head left out, norm weights shifted by norm_offset (Gemma stores w for a scale of 1 + w)."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    rows = _qkv_rows(cfg)
    out = {}
    for hf_name, (ours, slot) in expand(table, cfg.n_layer).items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = sd[ours] if slot is None else sd[ours][slice(*rows[slot])]
        out[hf_name] = (t + norm_offset if hf_name.endswith("norm.weight") else t).contiguous()
    return out


def _llama_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = model.config
    out = _table_tensors(model, HF_LLAMA)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
    }
    return out, config


def _gemma3_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = model.config
    out = _table_tensors(model, HF_GEMMA3, norm_offset=-1.0)
    local = cfg.rope_theta_local or cfg.rope_theta
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "query_pre_attn_scalar": cfg.head_dim,  # scores / sqrt(hd)
        "sliding_window": cfg.sliding_window or cfg.block_size,
        "layer_types": ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.n_layer)],
        # transformers 5 reads rope_parameters; earlier versions the two thetas
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local}},
        "rope_theta": cfg.rope_theta, "rope_local_base_freq": local,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "torch_dtype": "float32",
    }
    return out, config


def _gpt2_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    for hf_name, (ours, slot) in expand(HF_GPT2, cfg.n_layer).items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if ours not in sd:  # a bias lmforge's model does without: zeros, one per output
            t = torch.zeros(sd[ours.removesuffix("bias") + "weight"].size(0))
        else:
            t = sd[ours].t() if slot == CONV1D else sd[ours]
        out[hf_name] = t.contiguous()
    C = cfg.n_embd
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": C, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "vocab_size": cfg.vocab_size, "activation_function": "gelu", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": "float32",
    }
    return out, config


def export_hf(model: nn.Module, tokenizer, out_dir: Path | str) -> Path:
    """Write `model` and its LMTokenizer as a Hugging Face model folder (atomically)."""
    layout = _layout(model.config)
    tensors, config = {"llama": _llama_tensors, "gemma3": _gemma3_tensors, "gpt2": _gpt2_tensors}[layout](model)
    tok = tokenizer
    name = tok.tk.id_to_token
    if tok.eot_id is not None:
        config["eos_token_id"] = tok.eot_id
    if tok.bos_id is not None:
        config["bos_token_id"] = tok.bos_id
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                  "clean_up_tokenization_spaces": False}
    if tok.eot_id is not None:
        tok_config["eos_token"] = name(tok.eot_id)
    if tok.bos_id is not None:
        tok_config["bos_token"] = name(tok.bos_id)
    if tok.add_bos:
        tok_config["add_bos_token"] = True
    if tok.chat_template:
        tok_config["chat_template"] = tok.chat_template
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(
            {k: config[k] for k in ("eos_token_id", "bos_token_id") if k in config}, indent=2) + "\n")
        tok.tk.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------- load
def is_hf_dir(path: Path | str) -> bool:
    """A Hugging Face model folder: its config.json names a model type. (lmforge checkpoints have
    a config.json too, tagged with their own format instead; pulled models have a manifest.)"""
    path = Path(path)
    if not (path / "config.json").is_file() or (path / "manifest.json").is_file():
        return False
    try:
        d = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the checkpoint reader reports it
    return isinstance(d, dict) and d.get("format") != FORMAT and ("model_type" in d or "architectures" in d)


def _read_config(path: Path) -> dict[str, Any]:
    d = load_json(path / "config.json")
    kind = d.get("model_type")
    if kind not in SUPPORTED:
        archs = ", ".join(d.get("architectures") or []) or "no architectures"
        raise LMForgeError(f"{path}: unsupported architecture {kind!r} ({archs}); lmforge loads "
                           + ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items()))
    return d


def _need(d: dict, key: str, path: Path) -> int:
    if not isinstance(d.get(key), int):
        raise LMForgeError(f"{path}: config.json has no integer {key!r}")
    return d[key]


def _llama_config(d: dict, path: Path) -> ModelConfig:
    if d.get("hidden_act", "silu") != "silu":
        raise LMForgeError(f"{path}: hidden_act {d['hidden_act']!r} is not supported (LLaMA's MLP is silu)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise LMForgeError(f"{path}: attention/MLP biases are not supported in the llama layout")
    # transformers 5 writes rope_parameters, earlier versions rope_theta and rope_scaling
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise LMForgeError(f"{path}: RoPE scaling {kind!r} is not supported (plain RoPE only)")
    n_embd, n_head = _need(d, "hidden_size", path), _need(d, "num_attention_heads", path)
    head_dim = d.get("head_dim") or n_embd // n_head
    return ModelConfig(
        family="gpt", vocab_size=_need(d, "vocab_size", path), block_size=_need(d, "max_position_embeddings", path),
        n_layer=_need(d, "num_hidden_layers", path), n_embd=n_embd, n_head=n_head,
        head_size=head_dim if head_dim * n_head != n_embd else None,
        n_kv_head=d.get("num_key_value_heads") or n_head, mlp_hidden=_need(d, "intermediate_size", path),
        norm="rmsnorm", pos="rope", mlp="swiglu", bias=False,
        rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),  # transformers' LlamaConfig defaults
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def _gemma3_config(d: dict, path: Path) -> ModelConfig:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise LMForgeError(f"{path}: hidden_activation {act!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
    if d.get("final_logit_softcapping") or d.get("attn_logit_softcapping"):
        raise LMForgeError(f"{path}: logit soft-capping is not supported")
    n_layer, n_head = _need(d, "num_hidden_layers", path), _need(d, "num_attention_heads", path)
    n_embd = _need(d, "hidden_size", path)
    head_dim = d.get("head_dim") or 256
    if d.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise LMForgeError(f"{path}: query_pre_attn_scalar other than head_dim is not supported")
    types = d.get("layer_types") or [
        "full_attention" if (i + 1) % d.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(n_layer)]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    every = full[0] + 1 if full else 0
    if [i for i in range(n_layer) if every and (i + 1) % every == 0] != full:
        raise LMForgeError(f"{path}: layer_types must repeat a fixed pattern (some local layers, then one global)")
    rope = d.get("rope_parameters") or {}
    for kind in rope.values():
        if isinstance(kind, dict) and kind.get("rope_type", "default") != "default":
            raise LMForgeError(f"{path}: RoPE scaling {kind['rope_type']!r} is not supported (plain RoPE only)")
    theta = rope.get("full_attention", {}).get("rope_theta", d.get("rope_theta", 1e6))
    local = rope.get("sliding_attention", {}).get("rope_theta", d.get("rope_local_base_freq", 1e4))
    return ModelConfig(
        family="gpt", vocab_size=_need(d, "vocab_size", path), block_size=_need(d, "max_position_embeddings", path),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head,
        head_size=head_dim if head_dim * n_head != n_embd else None, mlp_hidden=_need(d, "intermediate_size", path),
        norm="rmsnorm", pos="rope", mlp="geglu", bias=False, rope_theta=float(theta),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        qk_norm=True, post_norms=True, embed_scale=True, sliding_window=int(_need(d, "sliding_window", path)),
        global_every=every, rope_theta_local=float(local),
    )


def _gpt2_config(d: dict, path: Path, bias: bool) -> ModelConfig:
    act = d.get("activation_function", "gelu_new")
    if act != "gelu":  # OpenAI's checkpoints use gelu_new, the tanh approximation
        raise LMForgeError(f"{path}: activation_function {act!r} is not supported (lmforge's GPT-2 MLP is "
                           f"exact gelu)")
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
        raise LMForgeError(f"{path}: non-standard attention scaling is not supported")
    n_embd = _need(d, "n_embd", path)
    return ModelConfig(
        family="gpt", vocab_size=_need(d, "vocab_size", path), block_size=_need(d, "n_positions", path),
        n_layer=_need(d, "n_layer", path), n_embd=n_embd, n_head=_need(d, "n_head", path),
        mlp_hidden=d.get("n_inner") or 4 * n_embd, norm="layernorm", pos="learned", mlp="gelu", bias=bias,
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(d.get("tie_word_embeddings", True)),
    )


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = load_json(index).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise LMForgeError(f"{index} has no weight_map")
        files = [path / f for f in sorted(set(shards.values()))]
        for f in files:
            if not f.is_file():
                raise LMForgeError(f"{path}: shard {f.name} named in {index.name} is missing")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickled = " (lmforge never loads pickled .bin weights)" if any(path.glob("*.bin")) else ""
    raise LMForgeError(f"{path}: no weights: model.safetensors or model.safetensors.index.json{pickled}")


def load_hf_dir(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, Path]:
    """A Hugging Face model folder -> (lmforge GPT in float32, eval mode; its tokenizer.json)."""
    path = Path(path)
    d = _read_config(path)
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise LMForgeError(f"{path}: tokenizer.json is missing (lmforge reads only the fast-tokenizer file)")
    with ExitStack() as stack:
        # tensor name -> (file, open handle, name in the file): tensors are read one at a time
        where: dict[str, tuple[Path, Any, str]] = {}
        for f in _weight_files(path):
            try:
                st = stack.enter_context(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError, ValueError) as e:
                raise LMForgeError(f"{f} is corrupt or not a safetensors file ({e})") from None
            for name in st.keys():
                if name.endswith(_BUFFERS):
                    continue
                ours = name
                if d["model_type"] == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
                    ours = "transformer." + name  # OpenAI's original files drop the prefix
                where[ours] = (f, st, name)

        def read(name: str) -> torch.Tensor:
            f, st, orig = where[name]
            try:
                return st.get_tensor(orig)
            except (SafetensorError, OSError, ValueError) as e:
                raise LMForgeError(f"{f}: cannot read tensor {orig} ({e})") from None

        if d["model_type"] == "llama":
            cfg = _llama_config(d, path)
            table = expand(HF_LLAMA, cfg.n_layer)
        elif d["model_type"] == "gemma3_text":
            cfg = _gemma3_config(d, path)
            table = expand(HF_GEMMA3, cfg.n_layer)
        else:
            # lmforge's own bias-free GPTs export all-zero biases: load those without, as they were
            biases = [k for k in where if k.endswith(".bias")]
            bias = any(read(k).any() for k in biases)
            cfg = _gpt2_config(d, path, bias)
            table = expand(HF_GPT2, cfg.n_layer)
            if not bias:
                table = {k: v for k, v in table.items() if not k.endswith(".bias")}
                where = {k: v for k, v in where.items() if k not in biases}
        if cfg.tie_embeddings:  # some tied files still carry lm_head: ignored, as transformers does
            table.pop("lm_head.weight")
            where.pop("lm_head.weight", None)
        unexpected = sorted(set(where) - set(table))
        if unexpected:
            raise LMForgeError(f"{path}: unexpected tensor(s) for {d['model_type']}: {', '.join(unexpected[:4])}")
        missing = sorted(set(table) - set(where))
        if missing:
            raise LMForgeError(f"{path}: tensor(s) missing from the weights: {', '.join(missing[:4])}")
        model = build_model(cfg, device=device, init=False)
        params = model.state_dict()  # detached views of the model's own storage, filled in place
        rows = _qkv_rows(cfg)
        for hf_name, (ours, slot) in table.items():
            t = read(hf_name)
            if slot == CONV1D:
                t = t.t()
            dst = params[ours] if slot in (None, CONV1D) else params[ours][slice(*rows[slot])]
            if t.shape != dst.shape:
                got, want = tuple(t.shape), tuple(dst.shape)
                if slot == CONV1D:  # report the shapes as stored
                    got, want = got[::-1], want[::-1]
                raise LMForgeError(f"{path}: {hf_name} has shape {got}, config.json implies {want}")
            if cfg.qk_norm and hf_name.endswith("norm.weight"):
                t = t.float() + 1  # Gemma stores w for a scale of 1 + w
            dst.copy_(t)  # also casts fp16/bf16 files to float32
    model.reset_buffers()
    return model.eval(), tok_path


def tokenizer_settings(path: Path | str, tk) -> dict[str, Any]:
    """LMTokenizer's keyword arguments from a Hugging Face folder's tokenizer_config.json,
    generation_config.json and config.json; `tk` (a tokenizers.Tokenizer) resolves token names."""
    path = Path(path)

    def read(name: str) -> dict:
        p = path / name
        d = load_json(p) if p.is_file() else {}
        return d if isinstance(d, dict) else {}

    tok_cfg, gen, cfg = read("tokenizer_config.json"), read("generation_config.json"), read("config.json")

    def named(v) -> int | None:  # a token given as text or as an AddedToken dict
        v = v.get("content") if isinstance(v, dict) else v
        return tk.token_to_id(v) if isinstance(v, str) else None

    def ids(key: str) -> list[int]:  # generation_config wins; either may hold one id or a list
        v = gen.get(key, cfg.get(key))
        return [i for i in (v if isinstance(v, list) else [v]) if isinstance(i, int)]

    eos_ids, bos_ids = ids("eos_token_id"), ids("bos_token_id")
    eos = named(tok_cfg.get("eos_token"))
    eos = eos if eos is not None else (eos_ids or [None])[0]
    bos = named(tok_cfg.get("bos_token"))
    bos = bos if bos is not None else (bos_ids or [None])[0]
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None and bos is not None:  # no flag (LLaMA 3 style): does tokenizer.json's post-processor add it?
        plain, full = (tk.encode("a", add_special_tokens=x).ids for x in (False, True))
        add_bos = full[:1] == [bos] and plain[:1] != [bos]
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (path / "chat_template.jinja").is_file():  # where transformers 5 saves it
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    specials = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    turn_ends = [tk.token_to_id(t) for t in _TURN_ENDS if t in specials]
    return {"eos_id": eos, "bos_id": bos, "add_bos": bool(add_bos), "chat_template": template,
            "stop_ids": eos_ids + turn_ends}
