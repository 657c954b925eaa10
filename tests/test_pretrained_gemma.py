"""Tests on the real Gemma 3 270M from the store (`make test` pulls it first; skipped when it
has not been pulled). Its GGUF mixes Q8_0, Q5_0, Q4_K and Q6_K tensors."""

import os

import pytest
import torch

from lmforge import store
from lmforge.api import LM
from lmforge.models.quant import Int4Linear, Int8Table

pytestmark = pytest.mark.pretrained
NAME = "gemma3-270m"
MODEL = store.find(NAME)
if MODEL is None:
    pytest.skip(f"{NAME} is not pulled (run: lmforge pull {NAME})", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIXED = "Hello, world! 你好，世界。 def f(x):\n    return x**2  # 12345 🙂 naïve café\n\n\tindent  two  spaces"
PROSE = ("The history of computing begins with the abacus, and the first mechanical calculators were built "
         "in the seventeenth century. ") * 6  # about 120 tokens: several sliding windows would need more


@pytest.fixture(scope="module")
def float_lm():
    return LM.load(NAME, quantize="none")


@pytest.fixture(scope="module")
def fast_lm():
    return LM.load(NAME)


@pytest.mark.heavy
def test_parity_with_transformers(float_lm):
    transformers = pytest.importorskip("transformers")
    folder, file = str(MODEL.path), MODEL.manifest["file"]
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    for text in (MIXED, PROSE, "人工智能正在改变世界。"):
        assert float_lm.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    long_ids = [2] + float_lm.tokenizer.encode(PROSE * 5)[:700]  # past the 512-token sliding window
    for ids in (float_lm.encode_prompt(MIXED), long_ids):
        with torch.no_grad():
            diff = (float_lm.model(torch.tensor([ids]))[0] - hf(torch.tensor([ids])).logits).abs().max().item()
        print(f"Gemma 3 logits vs transformers ({len(ids)} tokens): max abs diff {diff:.2e}")
        assert diff < 1e-3


def test_fast_path_agrees_with_float_path(float_lm, fast_lm):
    assert isinstance(fast_lm.model.embed, Int8Table)
    # its Q4_K tensors are a quarter of the linears' weights: held as int8 with the rest
    assert not any(isinstance(m, Int4Linear) for m in fast_lm.model.modules())
    agree = total = 0
    dev = 0.0
    for text in (MIXED, PROSE, "人工智能正在改变世界，我们应该如何应对？"):
        ids = torch.tensor([float_lm.encode_prompt(text)])
        with torch.no_grad():
            a, b = float_lm.model(ids)[0], fast_lm.model(ids)[0]
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += ids.numel()
        dev = max(dev, (a - b).abs().max().item())
    print(f"quantized vs float on Gemma 3: argmax agreement {agree / total:.1%}, max logit deviation {dev:.3f}")
    assert agree / total >= 0.97


def test_multilingual_generation(fast_lm):
    out = fast_lm.generate("中国的首都是", max_new_tokens=12, temperature=0)
    assert any("\u4e00" <= c <= "\u9fff" for c in out), out
    with pytest.raises(Exception, match="no chat template"):
        fast_lm.tokenizer.render_chat([{"role": "user", "content": "hi"}])
