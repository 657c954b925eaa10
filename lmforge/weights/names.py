"""Declarative tables from foreign tensor names to lmforge's GPT names.

Each entry maps a foreign name pattern ({i} = layer index) to an lmforge name, optionally with
a slot: q, k and v are separate tensors elsewhere but one fused `qkv_proj` here, so the loader
concatenates the slots in the order q, k, v along the output dimension.
"""

from __future__ import annotations

# GGUF names written by llama.cpp's converters, for the `llama` architecture
GGUF_LLAMA: dict[str, str | tuple[str, str]] = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": ("blocks.{i}.attn.qkv_proj.weight", "q"),
    "blk.{i}.attn_k.weight": ("blocks.{i}.attn.qkv_proj.weight", "k"),
    "blk.{i}.attn_v.weight": ("blocks.{i}.attn.qkv_proj.weight", "v"),
    "blk.{i}.attn_output.weight": "blocks.{i}.attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.mlp_norm.weight",
    "blk.{i}.ffn_gate.weight": "blocks.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "blocks.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "blocks.{i}.mlp.down_proj.weight",
}

# GGUF names for the `gemma3` architecture: LLaMA's, plus QK-norms and the norms after attention
# and MLP. (llama.cpp's converter stores Gemma's norm weights as 1 + w, so they load as plain
# RMSNorm scales; its `ffn_norm` is Gemma's pre-feed-forward norm.)
GGUF_GEMMA3: dict[str, str | tuple[str, str]] = {
    **{k: v for k, v in GGUF_LLAMA.items() if k != "output.weight"},
    "blk.{i}.attn_q_norm.weight": "blocks.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "blocks.{i}.attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "blocks.{i}.attn_out_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "blocks.{i}.mlp_out_norm.weight",
}

# Hugging Face LlamaForCausalLM names (export writes these; the HF loader reads them)
HF_LLAMA: dict[str, str | tuple[str, str]] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": ("blocks.{i}.attn.qkv_proj.weight", "q"),
    "model.layers.{i}.self_attn.k_proj.weight": ("blocks.{i}.attn.qkv_proj.weight", "k"),
    "model.layers.{i}.self_attn.v_proj.weight": ("blocks.{i}.attn.qkv_proj.weight", "v"),
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
}

# Hugging Face Gemma3ForCausalLM (model_type gemma3_text). Its RMSNorms scale by (1 + w), so
# every *norm.weight is stored 1 less than lmforge's multiplicative scale (see hf.py).
HF_GEMMA3: dict[str, str | tuple[str, str]] = {
    **{k: v for k, v in HF_LLAMA.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.attn_out_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blocks.{i}.mlp_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blocks.{i}.mlp_out_norm.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "blocks.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blocks.{i}.attn.k_norm.weight",
}

# Hugging Face BertModel (sentence-transformers' encoders); a "bert." prefix (task models) is
# stripped before lookup. Weights and biases of q, k, v fill the fused qkv_proj alike.
HF_BERT: dict[str, str | tuple[str, str]] = {
    "embeddings.word_embeddings.weight": "embed.weight",
    "embeddings.position_embeddings.weight": "pos_embed.weight",
    "embeddings.token_type_embeddings.weight": "type_embed.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    **{f"encoder.layer.{{i}}.attention.self.{hf}.{p}": (f"blocks.{{i}}.qkv_proj.{p}", slot)
       for hf, slot in (("query", "q"), ("key", "k"), ("value", "v")) for p in ("weight", "bias")},
    **{f"encoder.layer.{{i}}.{hf}.{p}": f"blocks.{{i}}.{ours}.{p}"
       for hf, ours in (("attention.output.dense", "o_proj"), ("attention.output.LayerNorm", "attn_norm"),
                        ("intermediate.dense", "up_proj"), ("output.dense", "down_proj"),
                        ("output.LayerNorm", "mlp_norm"))
       for p in ("weight", "bias")},
}

SLOTS = ("q", "k", "v")


def expand(table: dict[str, str | tuple[str, str]], n_layer: int) -> dict[str, tuple[str, str | None]]:
    """Concrete foreign name -> (lmforge name, slot or None) for every layer."""
    out: dict[str, tuple[str, str | None]] = {}
    for src, dst in table.items():
        name, slot = (dst, None) if isinstance(dst, str) else dst
        if "{i}" in src:
            for i in range(n_layer):
                out[src.format(i=i)] = (name.format(i=i), slot)
        else:
            out[src] = (name, slot)
    return out
