"""The engine on the two pulled decoders, on every kernel build this CPU runs: the quantized
decoding path agrees with the float path, a request's greedy tokens do not depend on what else
is in the batch, and the golden chat answer holds. Skips when a model is not pulled."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge import store
from lmforge.api import LM
from lmforge.engine import Engine, Request, SamplingParams
from lmforge.models import kernels

pytestmark = pytest.mark.pretrained
GREEDY = SamplingParams(temperature=0)
NAMES = [n for n in ("smollm2-135m-instruct", "gemma3-270m") if store.find(n) is not None]
if not NAMES:
    pytest.skip("no pretrained decoder pulled (run: lmforge pull smollm2-135m-instruct)", allow_module_level=True)
TEXT = ("The history of computing begins with the abacus, and the first mechanical calculators were built "
        "in the seventeenth century. 你好，世界。 def f(x): return x ** 2  # squares")


# twelve prompts of 40 positions each: at 80 positions one near-tie that a change of rounding
# flips moved the figure by 1.25 points, as much as the margin above the floor
AGREEMENT_PROMPTS = [
    TEXT, "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. Then it ran into the forest, where",
    "In mathematics, a prime number is a natural number greater than 1 that",
    "Python is a programming language that lets you work quickly and",
    "The French Revolution began in 1789 and ended in",
    "Photosynthesis is the process by which green plants",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the sea, there lived",
    "The mitochondria is the powerhouse of the cell. It produces",
    "To make a cup of tea, first boil the water, then",
    "The stock market fell sharply on Monday after investors",
]


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    return request.param, LM.load(request.param), LM.load(request.param, quantize="none")


def _with_variant(lm, variant, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", variant)
    lm.model.invalidate_plan()
    assert kernels.library() is not None


@pytest.mark.heavy
@pytest.mark.parametrize("variant", list(kernels.VARIANTS))
def test_quantized_decoding_agrees_with_the_float_path(pair, variant, monkeypatch):
    """Teacher-forced: the float model's own greedy continuation is fed one token at a time
    through the quantized decoding step (the C step of this build); its argmax must match the
    float model's full forward at >= 97% of the positions."""
    if not kernels.runnable(variant):
        pytest.skip(f"this CPU cannot run the {variant} build")
    name, q, f = pair
    _with_variant(q, variant, monkeypatch)
    agree = total = 0
    for prompt in AGREEMENT_PROMPTS:
        ids = f.tokenizer.encode(prompt, check=False)[:40]
        seq = ids + list(f.engine.generate(ids, 40, GREEDY))
        with torch.inference_mode():
            ref = f.model(torch.tensor([seq]))[0][0].argmax(-1)  # (T,)
        eng = Engine(q.model)
        got = []
        req = Request(ids, len(seq) - len(ids), GREEDY,
                      processors=[_Forcer(seq[len(ids):], got)])  # feed the float model's tokens
        list(eng.run([req]))
        agree += sum(int(a == b) for a, b in zip(got, ref[len(ids) - 1:len(seq) - 1].tolist()))
        total += len(got)
    print(f"{name} [{variant}]: decode-path argmax agreement {agree / total:.1%} over {total} positions")
    assert agree / total >= 0.97


class _Forcer:
    """Records the model's argmax at each step, then forces the given token."""

    def __init__(self, tokens, record):
        self.tokens, self.record, self.i = tokens, record, 0

    def __call__(self, ids, logits):
        self.record.append(int(logits[0].argmax()))
        forced = torch.full_like(logits, float("-inf"))
        forced[0, self.tokens[self.i]] = 0.0
        self.i += 1
        return forced


@pytest.mark.heavy
@pytest.mark.parametrize("variant", list(kernels.VARIANTS))
def test_join_and_leave_gives_every_request_its_solo_tokens(pair, variant, monkeypatch):
    """16 requests join at random steps and leave when done; each one's greedy tokens equal
    the same request run alone, token for token (batch-invariant numerics)."""
    if not kernels.runnable(variant):
        pytest.skip(f"this CPU cannot run the {variant} build")
    name, q, _ = pair
    _with_variant(q, variant, monkeypatch)
    rng = random.Random(0)
    all_ids = q.tokenizer.encode(TEXT * 2, check=False)
    prompts = []
    for _ in range(16):
        a = rng.randrange(0, len(all_ids) - 30)
        prompts.append(all_ids[a:a + rng.randrange(3, 30)])
    n_new = [rng.randrange(2, 10) for _ in prompts]
    eng = Engine(q.model, prefill_chunk=16)
    arrivals = sorted((rng.randrange(0, 25), i) for i in range(16))
    ids, outs, step, most = {}, {}, 0, 0
    while arrivals or eng.has_work:
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            ids[eng.submit(Request(prompts[i], n_new[i], GREEDY))] = i
        for ev in eng.step():
            if ev.token is not None:
                outs.setdefault(ids[ev.request_id], []).append(ev.token)
        most, step = max(most, eng.active), step + 1
    solo = [list(Engine(q.model, prefill_chunk=16).generate(p, n, GREEDY)) for p, n in zip(prompts, n_new)]
    assert [outs[i] for i in range(16)] == solo
    assert most >= 6  # they did run side by side


@pytest.mark.parametrize("variant", list(kernels.VARIANTS))
def test_golden_chat_answer_on_every_kernel_build(variant, monkeypatch):
    if not kernels.runnable(variant):
        pytest.skip(f"this CPU cannot run the {variant} build")
    if "smollm2-135m-instruct" not in NAMES:
        pytest.skip("smollm2-135m-instruct is not pulled")
    lm = LM.load("smollm2-135m-instruct")
    _with_variant(lm, variant, monkeypatch)
    evs = list(lm.chat_events([{"role": "user", "content": "Which city is the capital of France?"}],
                              max_new_tokens=20, temperature=0))
    assert "Paris" in "".join(e.text for e in evs)
    assert evs[-1].finish_reason in ("stop", "length") and evs[-1].usage.completion_tokens == \
        sum(1 for e in evs if e.token is not None)
