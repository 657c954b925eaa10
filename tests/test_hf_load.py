"""Loading Hugging Face model folders (what `export` writes, and hub-style variants of it) on tiny
models made here, checked against the original model and against transformers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.api import LM
from lmforge.config import ModelConfig
from lmforge.engine import SamplingParams
from lmforge.errors import LMForgeError
from lmforge.models import build_model
from lmforge.tokenizer import LMTokenizer
from lmforge.weights.checkpoint import save_checkpoint
from lmforge.weights.hf import is_hf_dir

from conftest import pydoc_text
from test_cli import assert_clean_error, run_cli
from test_gguf import CHATML, bpe_tokenizer, llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXT = "def add(a, b): return a + b"


def gpt2_config(vocab: int, bias: bool) -> ModelConfig:
    return ModelConfig(family="gpt", vocab_size=vocab, block_size=64, n_layer=2, n_embd=32, n_head=4, mlp_hidden=96,
                       norm="layernorm", pos="learned", mlp="gelu", bias=bias, tie_embeddings=False)


CONFIGS = {
    "llama": lambda v: llama_config(v),  # RMSNorm, RoPE, SwiGLU, GQA (4 heads, 2 kv), tied
    "llama-untied": lambda v: ModelConfig(**dict(llama_config(v).to_dict(), tie_embeddings=False, rope_theta=5e5)),
    "llama-wide-heads": lambda v: ModelConfig(**dict(llama_config(v).to_dict(), head_size=16)),  # head_dim != C / nh
    "gpt2": lambda v: gpt2_config(v, bias=False),  # exported with zero biases
    "gpt2-bias": lambda v: gpt2_config(v, bias=True),
}


@pytest.fixture(scope="module")
def tok():
    t = bpe_tokenizer()
    return LMTokenizer(t.tk, "bpe", eos_id=t.tk.token_to_id("<|im_end|>"), chat_template=CHATML)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """kind -> (original model, exported folder), random weights large enough to give varied tokens."""
    out = {}
    for kind, make in CONFIGS.items():
        torch.manual_seed(0)
        model = build_model(make(tok.vocab_size)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0, 0.2) if p.dim() >= 2 else p.add_(0.1 * torch.randn_like(p))
        out[kind] = (model, LM(model, tok).export(tmp_path_factory.mktemp("hf") / kind))
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("kind", CONFIGS)
def test_exported_folder_loads_back_exactly(exported, tok, kind):
    model, folder = exported[kind]
    lm = LM.load(folder, quantize="none")
    assert lm.checkpoint is None and lm.quantized is None
    assert lm.config.to_dict() == model.config.to_dict()  # biases included: zero ones are left out
    ids = tok.encode(TEXT)
    assert (_logits(lm.model, ids) - _logits(model, ids)).abs().max().item() < 1e-5
    greedy = SamplingParams(temperature=0)
    assert list(lm.engine.generate(ids, 12, greedy)) == list(LM(model, tok).engine.generate(ids, 12, greedy))
    t = lm.tokenizer
    assert (t.eot_id, t.bos_id, t.add_bos, t.chat_template) == (tok.eot_id, None, False, CHATML)
    assert "<|im_start|>assistant\n" in lm.tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert LM.load(folder).quantized == "int8"  # pretrained weights: int8 on CPU by default, like GGUF


@pytest.mark.parametrize("kind", ["llama", "llama-wide-heads", "gpt2-bias"])
def test_transformers_reads_the_same_folder_the_same_way(exported, tok, kind):
    transformers = pytest.importorskip("transformers")
    _, folder = exported[kind]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lm = LM.load(folder, quantize="none")
    ids = tok.encode(TEXT)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (_logits(lm.model, ids) - theirs).abs().max().item() < 1e-4


def test_sharded_half_precision_and_openai_style_names(exported, tok, tmp_path):
    """Hub folders differ from ours: shards with an index, bf16 weights, GPT-2 names without the
    `transformer.` prefix and with the causal-mask buffers."""
    for kind in ("llama", "gpt2-bias"):
        model, folder = exported[kind]
        out = tmp_path / kind
        out.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / f).write_bytes((folder / f).read_bytes())
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
        if kind == "gpt2-bias":
            tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
            tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, part in shards.items():
            save_file({k: tensors[k] for k in part}, out / file)
        weight_map = {k: file for file, part in shards.items() for k in part}
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        lm = LM.load(out, quantize="none")
        assert all(p.dtype == torch.float32 for p in lm.model.parameters())
        with torch.no_grad():  # the reference: the original weights rounded to bf16
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
        ids = tok.encode(TEXT)
        assert (_logits(lm.model, ids) - _logits(model, ids)).abs().max().item() < 1e-5


def test_cli_generate_and_eval_on_a_folder(exported, tok, tmp_path, capsys):
    model, folder = exported["llama"]
    ids = tok.encode("def")
    want = tok.decode(LM(model, tok).engine.generate(ids, 8, SamplingParams(temperature=0)))
    code, out, err = run_cli(["generate", folder, "def", "--max-tokens", "8", "--temperature", "0", "--quantize",
                              "none", "--device", "cpu", "--no-stream"], capsys)
    assert code == 0, err
    assert out == "def" + want + "\n"
    data = tmp_path / "held_out.txt"
    data.write_text(pydoc_text(2_000), encoding="utf-8")
    code, out, err = run_cli(["eval", folder, "--data", data, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "bits per byte" in out


def test_lmforge_checkpoints_are_not_mistaken_for_hf_folders(tok, tmp_path):
    model = build_model(llama_config(tok.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, step=3, tokenizer_json=tok.to_str())
    assert not is_hf_dir(tmp_path / "ckpt")
    assert LM.load(tmp_path / "ckpt").checkpoint.step == 3


def test_a_checkpoint_keeps_its_chat_template_and_stop_tokens(tmp_path):
    from conftest import tiny_chat_lm

    lm = tiny_chat_lm()
    save_checkpoint(tmp_path / "ckpt", lm.model, step=1, tokenizer_json=lm.tokenizer.to_str(),
                    tokenizer_extra=lm.tokenizer.saved_extra())
    back = LM.load(tmp_path / "ckpt")
    assert back.tokenizer.chat_template == lm.tokenizer.chat_template
    assert back.tokenizer.stop_ids == lm.tokenizer.stop_ids
    msgs = [{"role": "user", "content": "hi"}]
    assert back.tokenizer.render_chat(msgs) == lm.tokenizer.render_chat(msgs)
    # a plain tokenizer (no template, one stop id) needs no extra file
    assert LM(lm.model, type(lm.tokenizer)(lm.tokenizer.tk, "bpe")).tokenizer.saved_extra() is None


def _edit_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


def _truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])


BAD = {
    "missing tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "missing weights": (lambda f: (f / "model.safetensors").unlink(), "no weights"),
    "truncated weights": (_truncate, "corrupt or not a safetensors file"),
    "garbage weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "corrupt"),
    "unsupported architecture": (_edit_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
                                 "unsupported architecture 'qwen2' (Qwen2ForCausalLM)"),
    "wrong activation": (_edit_config(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    "rope scaling": (_edit_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "RoPE scaling 'llama3'"),
    "shape mismatch": (_edit_config(intermediate_size=48), "has shape (64, 32), config.json implies (48, 32)"),
    "missing tensor": (_edit_config(num_hidden_layers=3), "missing from the weights: model.layers.2."),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_folders_give_one_line_errors(exported, tmp_path, capsys, case):
    edit, message = BAD[case]
    _, folder = exported["llama"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    edit(bad)
    with pytest.raises(LMForgeError, match="^[^\n]*$") as e:
        LM.load(bad, quantize="none")
    assert message in str(e.value)
    code, _, err = run_cli(["generate", bad, "x", "--max-tokens", "2"], capsys)
    assert_clean_error(code, err, message.split(" (")[0][:30])
