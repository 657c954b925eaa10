"""Export to the Hugging Face layout (config.json + model.safetensors + tokenizer files), which
transformers' AutoModelForCausalLM and vLLM load directly.

LLaMA-style models (RMSNorm, RoPE, SwiGLU) become LlamaForCausalLM; GPT-2-style ones (LayerNorm,
learned positions, GELU) become GPT2LMHeadModel, whose Conv1D layers store weights transposed
and always carry biases (written as zeros when lmforge's model has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.common import atomic_dir
from lmforge.errors import LMForgeError
from lmforge.weights.names import HF_LLAMA, expand


def _layout(cfg) -> str:
    if cfg.family != "gpt":
        raise LMForgeError(f"only Transformer models export to the Hugging Face layout (this is a {cfg.family})")
    if cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu" and not cfg.bias:
        return "llama"
    if cfg.norm == "layernorm" and cfg.pos == "learned" and cfg.mlp == "gelu" and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    raise LMForgeError("this model mixes GPT-2 and LLaMA features; transformers has no matching architecture")


def _llama_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    inverse = {}
    for hf_name, (ours, slot) in expand(HF_LLAMA, cfg.n_layer).items():
        inverse.setdefault(ours, {})[slot] = hf_name
    nq, nk = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {}
    for ours, t in sd.items():
        if ours not in inverse or (ours == "lm_head.weight" and cfg.tie_embeddings):
            continue
        names = inverse[ours]
        if None in names:
            out[names[None]] = t.contiguous()
        else:  # fused qkv -> q, k, v
            out[names["q"]], out[names["k"]], out[names["v"]] = (x.contiguous() for x in t.split([nq, nk, nk]))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
    }
    return out, config


def _gpt2_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"]}

    def bias(name: str, n: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(n))

    C = cfg.n_embd
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + theirs + ".weight"] = sd[p + ours + ".weight"]
            out[h + theirs + ".bias"] = bias(p + ours + ".bias", C)
        # GPT-2's Conv1D keeps weights as (in, out): transpose every projection
        for ours, theirs in (("attn.qkv_proj", "attn.c_attn"), ("attn.o_proj", "attn.c_proj"),
                             ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            w = sd[p + ours + ".weight"]
            out[h + theirs + ".weight"] = w.t().contiguous()
            out[h + theirs + ".bias"] = bias(p + ours + ".bias", w.size(0))
    out["transformer.ln_f.weight"] = sd["norm.weight"]
    out["transformer.ln_f.bias"] = bias("norm.bias", C)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
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
    tensors, config = (_llama_tensors if layout == "llama" else _gpt2_tensors)(model)
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
