"""Gemma 3 on a tiny synthetic GGUF: transformers' own Gemma3ForCausalLM, randomly initialised,
is written out the way llama.cpp's converter writes Gemma (norm weights stored as 1 + w) and
must load into lmforge with the same logits -- past the sliding window too. The SentencePiece
tokenizer rebuilt from the file is checked against transformers' GGUF tokenizer loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.api import LM
from lmforge.engine import Engine, SamplingParams
from lmforge.engine.engine import generate_naive

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

WINDOW = 8
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  ", "   ", "<b>"]
PIECES = ["\u2581the", "\u2581a", "th", "he", "\u2581t", "in", "\u2581in", "ing", "er", "\u2581wor", "ld", "\u2581world",
          "or", "\u2581he", "ll", "llo", "\u2581hello"]


def spm_vocab() -> tuple[list[str], list[int]]:
    """Control pieces, user-defined pieces, 256 byte pieces, then letters and merged pieces."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581", ".", ","]
    tokens = CONTROL + USER + [f"<0x{b:02X}>" for b in range(256)] + letters + PIECES
    types = [3] * len(CONTROL) + [4] * len(USER) + [6] * 256 + [1] * (len(letters) + len(PIECES))
    return tokens, types


def hf_gemma(vocab: int):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=WINDOW, max_position_embeddings=128,
        query_pre_attn_scalar=32, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms scale by (1 + w): make w non-zero so a missed +1 shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return model


def write_gemma_gguf(path, model) -> None:
    cfg = model.config
    tokens, types = spm_vocab()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(WINDOW)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if "norm" in key:
            arr = arr + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into the stored weight
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            continue  # lm_head: tied
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    tokens, _ = spm_vocab()
    ref = hf_gemma(len(tokens))
    path = tmp_path_factory.mktemp("gemma") / "gemma.gguf"
    write_gemma_gguf(path, ref)
    return ref, path


def test_logits_match_transformers_past_the_sliding_window(gemma):
    ref, path = gemma
    lm = LM.load(path, quantize="none")
    cfg = lm.config
    assert (cfg.head_dim, cfg.sliding_window, cfg.qk_norm, cfg.post_norms, cfg.mlp) == (32, WINDOW, True, True, "geglu")
    assert [cfg.is_local(i) for i in range(6)] == [True] * 5 + [False]
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * WINDOW))  # three windows long
    with torch.no_grad():
        ours, theirs = lm.model(ids)[0], ref(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_cached_and_batched_generation_match_the_reference_path(gemma):
    _, path = gemma
    lm = LM.load(path, quantize="none")
    engine, greedy = Engine(lm.model), SamplingParams(temperature=0)
    prompts = [[2, 300, 301, 302], [2] + list(range(270, 290))]  # the second is longer than the window
    for p in prompts:
        assert list(engine.generate(p, 20, greedy)) == generate_naive(lm.model, p, 20, greedy)
    assert engine.generate_batch(prompts, 20, greedy) == [generate_naive(lm.model, p, 20, greedy) for p in prompts]


def test_quantized_gemma_tracks_the_float_path(gemma):
    _, path = gemma
    exact, fast = LM.load(path, quantize="none"), LM.load(path)
    assert fast.quantized == "gguf"
    torch.manual_seed(1)
    ids = torch.randint(0, exact.config.vocab_size, (3, 20))
    with torch.no_grad():
        a, b = exact.model(ids)[0], fast.model(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    assert (a - b).abs().max() < 0.3


def test_sentencepiece_tokenizer_matches_transformers(gemma):
    _, path = gemma
    lm = LM.load(path, quantize="none")
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["hello world", " the thing in the world", "hello  world   in\n\nthe<b>x", "héllo 世界 🙂",
             "<start_of_turn>user\nhello<end_of_turn>", "ing.,,the", ""]
    for text in texts:
        ids = lm.tokenizer.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert lm.tokenizer.decode(ids) == text  # byte fallback makes every string round-trip
    assert lm.encode_prompt("hello")[0] == 2  # Gemma adds <bos>
    assert lm.tokenizer.encode(" hello") == [lm.tokenizer.tk.token_to_id("\u2581hello")]
    assert lm.tokenizer.token_bytes[lm.tokenizer.tk.token_to_id("\u2581hello")] == 6
    assert lm.tokenizer.token_bytes[lm.tokenizer.tk.token_to_id("<0xE4>")] == 1


def test_export_round_trips_through_transformers(gemma, tmp_path):
    """export writes Gemma3ForCausalLM (norms back to Gemma's 1 + w form); transformers and
    lmforge's own Hugging Face loader both read it to the same logits and greedy tokens."""
    ref, path = gemma
    lm = LM.load(path, quantize="none")
    out = lm.export(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    back = LM.load(out, quantize="none")
    assert back.config == lm.config
    torch.manual_seed(2)
    ids = torch.randint(0, lm.config.vocab_size, (1, 3 * WINDOW))
    with torch.no_grad():
        ours = lm.model(ids)[0]
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ref(ids).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back.model(ids)[0], ours, atol=1e-6, rtol=1e-6)
    prompt = lm.encode_prompt("hello world")
    greedy = list(lm.engine.generate(prompt, 12, SamplingParams(temperature=0)))
    hf_greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy == hf_greedy
    assert back.tokenizer.encode("hello  world") == lm.tokenizer.encode("hello  world")
