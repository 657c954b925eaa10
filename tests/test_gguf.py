"""GGUF loading on tiny synthetic files written here with the `gguf` writer (no download needed)."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from lmforge.api import LM
from lmforge.config import ModelConfig
from lmforge.engine import Engine, SamplingParams
from lmforge.errors import LMForgeError
from lmforge.models import build_model
from lmforge.tokenizer import LMTokenizer

from conftest import MIXED, pydoc_text

gguf = pytest.importorskip("gguf")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def llama_config(vocab: int) -> ModelConfig:
    return ModelConfig(family="gpt", vocab_size=vocab, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                       mlp_hidden=64, norm="rmsnorm", pos="rope", mlp="swiglu", rope_theta=10000.0, norm_eps=1e-5,
                       tie_embeddings=True)


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: (h, 2, i) -> (h, i, 2). Written independently
    of lmforge's inverse so the round trip actually tests it."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def bpe_tokenizer() -> LMTokenizer:
    tok = LMTokenizer.train_bpe([pydoc_text(20_000), MIXED], vocab_size=300)
    # the control tokens a chat model has
    from tokenizers import AddedToken

    tok.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return LMTokenizer(tok.tk, "bpe")


def write_gguf(path, model: torch.nn.Module, tok: LMTokenizer, qtype=None, chat_template=CHATML, overrides=None):
    """overrides: {part of a tensor name: quantization type} over `qtype`, for mixed files."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    import json

    merges = json.loads(tok.tk.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    nq, nk = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim

    def put(name, arr):
        arr = np.ascontiguousarray(arr)
        qt = next((t for part, t in (overrides or {}).items() if part in name), qtype)
        if qt is not None and arr.ndim == 2:
            q = gguf.quants.quantize(arr, qt)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", sd["embed.weight"])
    put("output_norm.weight", sd["norm.weight"])
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        qkv = sd[p + "attn.qkv_proj.weight"]
        put(f"blk.{i}.attn_q.weight", permute_like_llama_cpp(qkv[:nq], cfg.n_head))
        put(f"blk.{i}.attn_k.weight", permute_like_llama_cpp(qkv[nq:nq + nk], cfg.n_kv_head))
        put(f"blk.{i}.attn_v.weight", qkv[nq + nk:])
        put(f"blk.{i}.attn_output.weight", sd[p + "attn.o_proj.weight"])
        put(f"blk.{i}.attn_norm.weight", sd[p + "attn_norm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "mlp_norm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def reference():
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = build_model(llama_config(tok.vocab_size))
    with torch.no_grad():  # non-trivial norm gains so a mis-mapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval(), tok


def test_float_gguf_loads_to_identical_logits(tmp_path, reference):
    model, tok = reference
    lm = LM.load(write_gguf(tmp_path / "m.gguf", model, tok), quantize="none")
    assert lm.config.n_kv_head == 2 and lm.config.tie_embeddings and lm.config.pos == "rope"
    idx = torch.tensor([tok.encode("def main(): return 42")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(idx)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_gguf_is_close(tmp_path, reference, qtype):
    model, tok = reference
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    lm = LM.load(write_gguf(tmp_path / "q.gguf", model, tok, qtype=qt), quantize="none")
    idx = torch.tensor([tok.encode("for x in range(10): print(x)")])
    with torch.no_grad():
        ref, got = model(idx)[0], lm.model(idx)[0]
    err = (ref - got).abs().max().item()
    assert 0 < err < (0.05 if qtype == "Q8_0" else 0.5), err


@pytest.mark.parametrize("qtype", [None, "Q4_1"])
def test_quantized_fast_path_tracks_the_float_path(tmp_path, reference, qtype):
    """auto on CPU: 4-bit blocks become int4 groups unchanged, other linears int8 rows, the tied
    token table an Int8Table; the result must track the float path of the same file."""
    from lmforge.models.quant import Int4Linear, Int8Linear, Int8Table

    model, tok = reference
    qt = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    path = write_gguf(tmp_path / "m.gguf", model, tok, qtype=qt)
    exact, fast = LM.load(path, quantize="none"), LM.load(path)
    assert fast.quantized == "gguf" and exact.quantized is None
    assert isinstance(fast.model.blocks[0].attn.qkv_proj, Int4Linear if qtype else Int8Linear)
    assert isinstance(fast.model.embed, Int8Table)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in fast.model.parameters())
    torch.manual_seed(1)
    idx = torch.randint(0, tok.vocab_size, (4, 48))
    with torch.no_grad():
        ref, got = exact.model(idx)[0], fast.model(idx)[0]
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    dev = (ref - got).abs().max().item()
    print(f"{qtype or 'F32'} quantized vs float: max logit deviation {dev:.4f}, argmax agreement {agree:.2%}")
    assert agree >= 0.97 and 0 < dev < 0.2
    with pytest.raises(LMForgeError, match="float weights"):
        fast.export(tmp_path / "hf")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_unpack_4bit_matches_the_gguf_dequantizer(qtype):
    """lmforge reads 4-bit blocks itself (to keep their integers); gguf's own dequantizer is the
    reference. Q4_K cannot be written by the gguf package, so its blocks are random bytes."""
    from types import SimpleNamespace

    from gguf.quants import dequantize

    from lmforge.weights.gguf import unpack_4bit

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    if qtype == "Q4_K":
        blocks = rng.integers(0, 256, size=(6, 2, 144), dtype=np.uint8)
        blocks[..., 0:4] = np.frombuffer(rng.uniform(0.001, 0.1, 6 * 2 * 2).astype(np.float16).tobytes(),
                                         dtype=np.uint8).reshape(6, 2, 4)
        raw = blocks.reshape(6, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((6, 256)).astype(np.float32), qt)
    t = SimpleNamespace(name="w", tensor_type=qt, data=raw)
    q, scale, offset = unpack_4bit(t)
    cols = 512 if qtype == "Q4_K" else 256
    assert q.min() >= 0 and q.max() <= 15 and q.shape == (6, cols) and scale.shape == (6, cols // 32)
    mine = (q.reshape(6, -1, 32) * scale[..., None] + offset[..., None]).reshape(6, cols)
    np.testing.assert_allclose(mine, dequantize(raw, qt), rtol=1e-6, atol=1e-6)


def test_a_few_4bit_matrices_among_8bit_ones_are_held_as_int8(tmp_path, reference):
    """Like Gemma 3's Q4_K_M: the 4-bit minority (here the output projections) joins the int8
    majority, so batches never meet the one-row int4 kernel; a 4-bit majority stays int4."""
    from lmforge.models.quant import Int4Linear, Int8Linear

    model, tok = reference
    Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    mixed = LM.load(write_gguf(tmp_path / "mixed.gguf", model, tok, qtype=Q8, overrides={"attn_output": Q4}))
    assert all(isinstance(m, Int8Linear) for m in mixed.model.modules() if isinstance(m, (Int4Linear, Int8Linear)))
    mostly4 = LM.load(write_gguf(tmp_path / "mostly4.gguf", model, tok, qtype=Q4, overrides={"attn_output": Q8}))
    assert isinstance(mostly4.model.blocks[0].mlp.up_proj, Int4Linear)
    assert isinstance(mostly4.model.blocks[0].attn.o_proj, Int8Linear)
    exact = LM.load(tmp_path / "mixed.gguf", quantize="none")
    idx = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = exact.model(idx)[0], mixed.model(idx)[0]
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.97


def test_int4_and_int8_table_kernels_match_a_float_reference():
    from lmforge.models.quant import Int4Linear, Int8Table

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False)
    q = Int4Linear.from_linear(lin)
    x = torch.randn(5, 64)
    # the int4 weights, dequantized independently: groups of 32 with their own min/max
    g = lin.weight.detach().view(96, 2, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    w4 = (torch.round((g - lo) / step) * step + lo).view(96, 64)
    torch.testing.assert_close(q(x), x @ w4.t(), atol=0.05, rtol=0.02)
    xb = torch.randn(40, 64)
    torch.testing.assert_close(q(xb), xb @ w4.t(), atol=0.05, rtol=0.02)  # a batch: the same kernel
    from lmforge.models.quant import ACTIVATIONS, Int8Linear

    q8 = Int8Linear.from_linear(lin)
    w8r = q8.weight.float() * q8.scales.float()[:, None]
    for mode in ACTIVATIONS:  # every batch form against the dequantized int8 weights
        q8.activations = mode
        torch.testing.assert_close(q8(xb), xb @ w8r.t(), atol=0.05 if mode == "int8" else 0.02, rtol=0.02)
    table = torch.randn(130, 64)  # not a multiple of the int4 packing block (the fallback pads)
    t = Int8Table.from_float(table)
    gd = (table.view(130, 2, 32).abs().amax(-1, keepdim=True) / 127).half().float()  # fp16 scales (Q8_0)
    w8 = (torch.round(table.view(130, 2, 32) / gd).clamp(-127, 127) * gd).view(130, 64)
    idx = torch.tensor([[0, 1, 63, 64], [65, 127, 128, 129]])
    torch.testing.assert_close(t(idx), w8[idx], atol=1e-6, rtol=1e-6)
    ref = x @ w8.t()
    from lmforge.models import kernels

    if shutil.which("cc") or shutil.which("gcc"):  # with a compiler the C kernel must run (and be exact)
        assert kernels.library() is not None, "the C kernels failed to build where a compiler exists"
        torch.testing.assert_close(t.project(x), ref, atol=2e-2 if kernels.library().lmf_isa() == 1 else 2e-3,
                                   rtol=1e-2 if kernels.library().lmf_isa() == 1 else 1e-3)
    tiny = Int8Table.from_float(table * 1e-6)  # scales under fp16's range: off by its rounding, not 100%
    torch.testing.assert_close(tiny(idx), table[idx] * 1e-6, rtol=0, atol=3.1e-8)  # half the smallest fp16 step
    original = kernels.library
    try:  # without a compiler: PyTorch's int4 kernel over the table's two 4-bit halves
        kernels.library = lambda: None
        torch.testing.assert_close(t.project(x), ref, atol=0.1, rtol=0.02)  # bf16 activations
        assert t._halves is not None  # the fallback's copy was built
        torch.testing.assert_close(q8(x[:2]), x[:2] @ w8r.t(), atol=0.05, rtol=0.02)  # int8pack_mm, bf16
    finally:
        kernels.library = original


def test_tokenizer_rebuilt_from_gguf_matches(tmp_path, reference):
    model, tok = reference
    lm = LM.load(write_gguf(tmp_path / "m.gguf", model, tok), quantize="none")
    text = MIXED + " <|im_start|>user\nhi<|im_end|> 12345"
    assert lm.tokenizer.encode(text, check=False) == tok.encode(text, check=False)
    assert lm.tokenizer.decode(lm.tokenizer.encode(text, check=False)) == text
    assert lm.tokenizer.eot_id == tok.tk.token_to_id("<|im_end|>")


def test_chat_template_and_generation(tmp_path, reference):
    model, tok = reference
    lm = LM.load(write_gguf(tmp_path / "m.gguf", model, tok), quantize="none")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = lm.tokenizer.render_chat(msgs)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = lm.chat_ids(msgs)
    greedy = SamplingParams(temperature=0)
    expected = list(Engine(model).generate(ids, 12, greedy, stop_ids=lm.tokenizer.stop_ids))
    got = list(lm.engine.generate(ids, 12, greedy, stop_ids=lm.tokenizer.stop_ids))
    assert got == expected
    # the chat reply is the decoded text of those greedy tokens, up to the first stop token
    reply = "".join(lm.chat(msgs, max_new_tokens=12, temperature=0))
    until_stop = [t for t in itertools.takewhile(lambda t: t not in lm.tokenizer.stop_ids, expected)]
    assert reply == lm.tokenizer.decode(until_stop)


def test_fit_history_drops_oldest_turns(tmp_path, reference):
    model, tok = reference
    lm = LM.load(write_gguf(tmp_path / "m.gguf", model, tok), quantize="none")
    msgs = [{"role": "system", "content": "sys"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 3} for i in range(9)]
    fitted = lm.fit_history(msgs, reserve=10)
    assert fitted[0]["role"] == "system" and fitted[-1] == msgs[-1]
    assert len(fitted) < len(msgs)
    assert len(lm.chat_ids(fitted)) + 10 <= lm.config.block_size
    with pytest.raises(LMForgeError, match="context"):
        lm.encode_prompt("word " * 100)


def test_bad_gguf_files(tmp_path, reference):
    model, tok = reference
    good = write_gguf(tmp_path / "m.gguf", model, tok)
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(LMForgeError, match="corrupt or truncated|tensors missing|cannot"):
        LM.load(tmp_path / "trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(LMForgeError, match="not a GGUF file"):
        LM.load(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LMForgeError, match="unsupported architecture 'mamba'"):
        LM.load(tmp_path / "arch.gguf")


def test_unknown_model_names(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    with pytest.raises(LMForgeError, match="not in the local store yet; run: lmforge pull smollm2-135m-instruct"):
        LM.load("smollm2-135m-instruct")
    with pytest.raises(LMForgeError, match="neither a path nor a known model"):
        LM.load("gpt-17")
