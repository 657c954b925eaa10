"""Tests on the real SmolLM2-135M-Instruct from the store (`make test` pulls it first).
They skip when the model has not been pulled (no network)."""

import os

import pytest
import torch

from lmforge import store
from lmforge.api import LM
from lmforge.engine import SamplingParams
from lmforge.models import kernels

pytestmark = pytest.mark.pretrained
NAME = "smollm2-135m-instruct"
MODEL = store.find(NAME)
if MODEL is None:
    pytest.skip(f"{NAME} is not pulled (run: lmforge pull {NAME})", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["Hello, world! 你好，世界。 def f(x): return x**2  # 12345 🙂 naïve café",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "The history of computing begins with the abacus, and the first mechanical calculators were"]


@pytest.fixture(scope="module")
def float_lm():
    return LM.load(NAME, quantize="none")


@pytest.fixture(scope="module")
def int8_lm():
    return LM.load(NAME)


def test_chat_answers_with_the_template(int8_lm):
    # ("What is the capital of France?" is a near tie for the first token, 0.08 logits apart in
    # float32: llama.cpp's quantized path, like lmforge's, starts "L'Étoile" there)
    reply = "".join(int8_lm.chat([{"role": "user", "content": "Which city is the capital of France?"}],
                                 max_new_tokens=20, temperature=0))
    assert "Paris" in reply


def test_int8_agrees_with_float_path(float_lm, int8_lm):
    agree, total, dev = 0, 0, 0.0
    for text in PROMPTS:
        ids = torch.tensor([float_lm.tokenizer.encode(text, check=False)])
        with torch.no_grad():
            a, b = float_lm.model(ids)[0], int8_lm.model(ids)[0]
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += ids.numel()
        dev = max(dev, (a - b).abs().max().item())
    print(f"int8 vs float on SmolLM2: argmax agreement {agree / total:.1%}, max logit deviation {dev:.3f}")
    assert agree / total >= 0.97


@pytest.mark.heavy
def test_parity_with_transformers_gguf_loader(float_lm):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    folder, file = str(MODEL.path), MODEL.manifest["file"]
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    for text in PROMPTS:
        ids = float_lm.tokenizer.encode(text, check=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            diff = (float_lm.model(torch.tensor([ids]))[0] - hf(torch.tensor([ids])).logits).abs().max().item()
        assert diff < 1e-3


def test_export_round_trips_through_transformers(float_lm, tmp_path):
    transformers = pytest.importorskip("transformers")
    float_lm.export(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = float_lm.encode_prompt(PROMPTS[2])
    ours = list(float_lm.engine.generate(ids, 16, SamplingParams(temperature=0)))
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs


def test_exported_folder_loads_and_chats(float_lm, tmp_path):
    """The Hugging Face loader on a real export: same tokens as the GGUF path, and chat works."""
    float_lm.export(tmp_path / "hf")
    lm = LM.load(tmp_path / "hf", quantize="none")
    ids = float_lm.encode_prompt(PROMPTS[2])
    assert lm.encode_prompt(PROMPTS[2]) == ids
    params = SamplingParams(temperature=0)
    assert list(lm.engine.generate(ids, 16, params)) == list(float_lm.engine.generate(ids, 16, params))
    assert lm.tokenizer.stop_ids == float_lm.tokenizer.stop_ids
    reply = "".join(lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=20,
                            temperature=0))
    assert "Paris" in reply


@pytest.fixture(scope="module")
def pydoc_collection(tmp_path_factory):
    """The default collection's content: Python's docs with MiniLM vectors (embedded once)."""
    if store.find("minilm-l6") is None:
        pytest.skip("minilm-l6 is not pulled")
    from lmforge.encoders import Encoder
    from lmforge.rag.collection import Collection

    col = Collection.open("pydoc", create=True, root=tmp_path_factory.mktemp("col"),
                          encoder=Encoder.load("minilm-l6", device="cpu"))
    col.add_pydoc()
    return col


@pytest.mark.heavy
@pytest.mark.parametrize("variant", list(kernels.VARIANTS))
def test_ask_cites_the_right_python_doc_topics(pydoc_collection, int8_lm, variant, monkeypatch):
    """The README's retrieval story end to end, on every kernel build the CPU runs: the default
    collection and SmolLM2 answer two questions; the cited topics are asserted, not the wording."""
    if not kernels.runnable(variant):
        pytest.skip(f"this CPU cannot run the {variant} build")
    from lmforge.rag.ask import ask

    col, lm = pydoc_collection, int8_lm
    monkeypatch.setenv("LMFORGE_KERNELS", variant)
    lm.model.invalidate_plan()
    assert kernels.library().lmf_isa() == kernels.VARIANTS[variant][2]
    for question, topic in (("How do I open a file for writing?", "pydoc:types"),
                            ("What does the with statement do?", "pydoc:with")):
        a = ask(question, col, lm, max_new_tokens=80)
        cited = {a.sources[n - 1].source for n in a.cited}
        print(question, "->", sorted(cited), a.text[:120])
        assert a.found and cited == {topic} and not a.removed  # the right topic, and only it
    assert not ask("Who won the 1998 football world cup?", col, lm).found


@pytest.mark.heavy
def test_eval_qa_answers_and_llm_reranking(tmp_path):
    """SmolLM2 answers a tiny SQuAD-format file through ask (scored by contains/EM/F1), and as
    a reranker puts the passage that answers a question first."""
    from test_rag import _squad_file

    from lmforge.rag.collection import Hit
    from lmforge.rag.evaluate import evaluate_squad
    from lmforge.rag.rerank import rerank

    lm = LM.load(NAME)
    answers = []
    r = evaluate_squad(_squad_file(tmp_path / "s.json"), lm, None, mode="bm25", k=1, log=lambda m: None,
                       on_answer=lambda q, a, g: answers.append((q, a, g)))
    print(answers, r)
    assert r["hit@1"] == 1.0 and r["answered"] == 3 and r["contains"] >= 1 / 3 and r["f1"] > 0
    passages = ["The Eiffel Tower was finished in 1889 in Paris.", "Penguins are birds that cannot fly but swim well.",
                "The Great Wall lies in the north of China."]
    hits = [Hit(i, 0.0, f"p{i}", "", t, 0, 0) for i, t in enumerate(passages)]
    for question, best in (("Can penguins fly?", "p1"), ("When was the Eiffel Tower finished?", "p0")):
        assert rerank(question, hits, "llm", lm=lm)[0].source == best
    if store.find("gemma3-270m") is not None:  # a base model whose tokenizer adds BOS
        gemma = LM.load("gemma3-270m")
        assert rerank("Can penguins fly?", hits, "llm", lm=gemma)[0].source == "p1"
