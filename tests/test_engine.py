"""The engine's requests, events and continuous batching, on a scripted model (no weights) and on
tiny real GPTs."""

from __future__ import annotations

import codecs
import random

import pytest
import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.engine import Engine, Request, SamplingParams
from lmforge.engine.engine import generate_naive
from lmforge.models import build_model

GREEDY = SamplingParams(temperature=0)
V = 256


class ScriptedLM(nn.Module):
    """A model with no weights worth the name: it writes every token it is fed into its cache
    slot and predicts (sum of the slot's tokens + 3 * position) mod 256, so a token that
    lands in the wrong slot, a wrong position or a stale reused prefix changes every later
    prediction. Byte-valued tokens, so a byte decoder reads them as text."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=V, block_size=4096)
        self.anchor = nn.Parameter(torch.zeros(1))  # (the engine reads the device from it)
        self.forwards: list[tuple[int, int]] = []  # (rows, tokens) per call

    def forward(self, idx=None, cache=None, last_only=False, **_):
        B, T = idx.shape
        self.forwards.append((B, T))
        k = cache.cache.k  # (1, S, 1, max_len, hd): token ids stored in [..., 0]
        starts = cache.row_pos if T == 1 else torch.full((B,), cache.pos)
        out = torch.full((B, T, V), -10.0)
        for b in range(B):
            s, p0 = cache.slots[b], int(starts[b])
            k[0, s, 0, p0:p0 + T, 0] = idx[b].float()
            for t in range(T):
                total = int(k[0, s, 0, :p0 + t + 1, 0].sum())
                out[b, t, (total + 3 * (p0 + t)) % V] = 10.0
        cache.advance(T)
        return (out[:, -1:] if last_only else out), None


class ByteDecoder:
    """UTF-8 bytes as tokens: push returns only completed characters."""

    def __init__(self):
        self.dec = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self.dec.decode(bytes([token_id]))

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


class Recorder:
    """A stateful processor: what it was shown and told."""

    def __init__(self):
        self.seen: list[list[int]] = []
        self.accepted: list[int] = []

    def __call__(self, ids, logits):
        self.seen.append(list(ids))
        return logits

    def accept(self, tok):
        self.accepted.append(tok)


def solo(model, prompt, n, **kw):
    return [ev.token for ev in Engine(model).run([Request(prompt, n, GREEDY, **kw)]) if ev.token is not None]


def test_scripted_model_decodes_what_its_rule_says():
    toks = solo(ScriptedLM(), [5, 6], 4)
    want, seq = [], [5, 6]
    for _ in range(4):
        nxt = (sum(seq) + 3 * (len(seq) - 1)) % V
        want.append(nxt)
        seq.append(nxt)
    assert toks == want


def test_processors_see_only_their_own_request():
    model = ScriptedLM()
    recs = [Recorder(), Recorder()]
    prompts = [[1, 2, 3], [200, 100]]
    eng = Engine(model)
    outs = {}
    reqs = [Request(p, 5, GREEDY, processors=[r]) for p, r in zip(prompts, recs)]
    for ev in eng.run(reqs):
        if ev.token is not None:
            outs.setdefault(ev.request_id, []).append(ev.token)
    for req, rec, p in zip(reqs, recs, prompts):
        out = outs[req.id]
        assert rec.accepted == out
        assert rec.seen == [p + out[:i] for i in range(len(out))]
    assert any(B == 2 for B, T in model.forwards if T == 1)  # they did decode side by side


def test_stop_string_across_token_boundaries_cuts_the_text():
    """"ab" then "cd" are fed byte by byte: a stop string "bc" spans two tokens; the text stops
    before it, the finish reason says why, and nothing of it was emitted early."""
    class Spell(nn.Module):
        def __init__(self, text):
            super().__init__()
            self.inner, self.text = ScriptedLM(), text.encode()
            self.config, self.anchor = self.inner.config, nn.Parameter(torch.zeros(1))

        def forward(self, idx=None, cache=None, last_only=False, **_):
            B, T = idx.shape
            pos = int(cache.row_pos[0]) if T == 1 else cache.pos + T - 1
            out = torch.full((B, 1, V), -10.0)
            out[:, 0, self.text[pos % len(self.text)]] = 10.0
            cache.advance(T)
            return out, None

    model = Spell("xxab" + "cd" + "ééé")
    evs = list(Engine(model).run([Request([0, 0, 0], 20, GREEDY, stop_strings=["bc"], decoder=ByteDecoder())]))
    assert "".join(e.text for e in evs) == "a"
    assert evs[-1].finish_reason == "stop_string"
    assert evs[-1].usage.completion_tokens == 3  # a, b, c
    # multi-byte characters arrive whole: é is two bytes, two tokens, one text delta
    evs = list(Engine(model).run([Request([0, 0, 0], 8, GREEDY, decoder=ByteDecoder())]))
    texts = [e.text for e in evs]
    assert texts == ["a", "b", "c", "d", "", "é", "", "é"]
    assert evs[-1].finish_reason == "length"


def test_finish_reasons_and_usage():
    model = ScriptedLM()
    evs = list(Engine(model).run([Request([1, 2], 6, GREEDY)]))
    assert [e.finish_reason for e in evs] == [None] * 5 + ["length"]
    assert (evs[-1].usage.prompt_tokens, evs[-1].usage.completion_tokens) == (2, 6)
    first = evs[2].token  # stop on the third token: it is reported, and the request ends there
    evs = list(Engine(model).run([Request([1, 2], 6, GREEDY, stop_ids=[first])]))
    assert evs[-1].token == first and evs[-1].finish_reason == "stop" and len(evs) == 3
    assert evs[-1].usage.completion_tokens == 3


def test_logprobs_and_top_alternatives():
    evs = list(Engine(ScriptedLM()).run([Request([1, 2], 3, GREEDY, logprobs=True, top_logprobs=3)]))
    for e in evs:
        assert e.top_logprobs[0][0] == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0][1])
        assert e.logprob == pytest.approx(torch.tensor([10.0] + [-10.0] * (V - 1)).log_softmax(0)[0].item())
        assert len(e.top_logprobs) == 3


def test_cancellation_frees_the_slot_for_a_waiting_request():
    model = ScriptedLM()
    eng = Engine(model, max_slots=1)
    a = eng.submit(Request([1], 1000, GREEDY))
    b = eng.submit(Request([2, 3], 4, GREEDY))
    evs = []
    for _ in range(5):
        evs += eng.step()
    assert eng.active == 1 and all(e.request_id == a for e in evs)  # b waits: one slot
    eng.cancel(a)
    while eng.has_work:
        evs += eng.step()
    ends = {e.request_id: e for e in evs if e.finish_reason}
    assert ends[a].finish_reason == "cancelled"
    assert ends[b].finish_reason == "length"
    assert [e.token for e in evs if e.request_id == b] == solo(model, [2, 3], 4)
    assert eng.cache.n_slots == 1


def test_cache_slots_double_as_requests_join():
    """Requests joining one at a time grow the cache in doublings (each grow copies the cache),
    never past max_slots, and every request still decodes as it would alone."""
    model = tiny_gpt()
    eng = Engine(model, max_slots=6)
    sizes, ids, evs = [], [], []
    for i in range(6):
        ids.append(eng.submit(Request([i + 1, 2], 20, GREEDY)))
        evs += eng.step()
        sizes.append(eng.cache.n_slots)
    assert sizes == [1, 2, 4, 4, 6, 6]
    while eng.has_work:
        evs += eng.step()
    for i, rid in enumerate(ids):
        assert [e.token for e in evs if e.request_id == rid] == solo(model, [i + 1, 2], 20)


def test_cancelling_a_waiting_request():
    eng = Engine(ScriptedLM(), max_slots=1)
    eng.submit(Request([1], 3, GREEDY))
    b = eng.submit(Request([2], 3, GREEDY))
    eng.cancel(b)
    evs = eng.step()
    assert any(e.request_id == b and e.finish_reason == "cancelled" for e in evs)


def _join_and_leave(model, prompts, n_new, seed=0, **engine_kw):
    """Requests join at random steps and leave when done; returns every request's tokens."""
    rng = random.Random(seed)
    eng = Engine(model, **engine_kw)
    arrivals = sorted((rng.randrange(0, 30), i) for i in range(len(prompts)))
    ids, outs, step = {}, {}, 0
    while arrivals or eng.has_work:
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            ids[eng.submit(Request(prompts[i], n_new[i], GREEDY))] = i
        for ev in eng.step():
            if ev.token is not None:
                outs.setdefault(ids[ev.request_id], []).append(ev.token)
        step += 1
    return [outs[i] for i in range(len(prompts))]


def test_join_and_leave_at_random_steps_equals_solo_runs_scripted():
    model = ScriptedLM()
    rng = random.Random(1)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(1, 40))] for _ in range(16)]
    n_new = [rng.randrange(1, 25) for _ in prompts]
    got = _join_and_leave(model, prompts, n_new, prefill_chunk=7)
    assert got == [solo(model, p, n) for p, n in zip(prompts, n_new)]
    assert max(B for B, T in model.forwards if T == 1) >= 4


def tiny_gpt(**kw):
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=96, block_size=256, pos="rope",
                      norm="rmsnorm", mlp="swiglu", bias=False, **kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # weights large enough that the greedy path is not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("quantized", [False, True])
def test_join_and_leave_equals_solo_runs_tiny_gpt(quantized):
    """Greedy tokens of 16 requests joining and leaving at random steps equal each one alone.
    Quantized with the C kernels, a decode row's numbers never depend on its neighbours, so
    this holds exactly; the float model's matmuls are expected to agree too at this size."""
    from lmforge.models.quant import quantize_model

    model = tiny_gpt(sliding_window=8)
    if quantized:
        quantize_model(model, "int8")
    rng = random.Random(2)
    prompts = [[rng.randrange(96) for _ in range(rng.randrange(1, 30))] for _ in range(16)]
    n_new = [rng.randrange(1, 20) for _ in prompts]
    got = _join_and_leave(model, prompts, n_new, prefill_chunk=5)
    assert got == [solo(model, p, n) for p, n in zip(prompts, n_new)]
    assert got[0] == generate_naive(model, prompts[0], n_new[0], GREEDY) or quantized


def test_prefix_reuse_gives_a_fresh_prefills_logits():
    model = tiny_gpt()
    eng = Engine(model, max_slots=2)
    base = list(range(1, 40))
    list(eng.run([Request(base, 3, GREEDY)]))
    other = base[:30] + [7, 7, 7]
    evs = list(eng.run([Request(other, 6, GREEDY, logprobs=True, top_logprobs=5)]))
    assert evs[-1].usage.cached_tokens == 30
    fresh = list(Engine(model).run([Request(other, 6, GREEDY, logprobs=True, top_logprobs=5)]))
    assert fresh[-1].usage.cached_tokens == 0
    assert [e.token for e in evs] == [e.token for e in fresh]
    for a, b in zip(evs, fresh):
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
        assert [lp for _, lp in a.top_logprobs] == pytest.approx([lp for _, lp in b.top_logprobs], abs=1e-4)
    # the same prompt again reuses all but its last token
    again = list(eng.run([Request(other, 2, GREEDY)]))
    assert again[-1].usage.cached_tokens == len(other) - 1


def test_input_embeddings_equal_to_the_token_rows_give_the_ids_logits():
    for quantized in (False, True):
        model = tiny_gpt(embed_scale=True)
        if quantized:
            from lmforge.models.quant import quantize_model

            quantize_model(model, "int8")
        ids = torch.tensor([[3, 9, 27, 81, 5, 60]])
        with torch.no_grad():
            a = model(ids)[0]
            b = model(input_embeds=model.embed(ids))[0]
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        embeds = model.embed(ids[0]).detach()  # (T, C)
        by_ids = solo(model, ids[0].tolist(), 8)
        assert [e.token for e in Engine(model).run([Request(None, 8, GREEDY, embeds=embeds)])
                if e.token is not None] == by_ids
    with pytest.raises(ValueError, match="not both"):
        model(ids, input_embeds=model.embed(ids))


def test_attention_probabilities_from_the_reference_path():
    """Probabilities sum to one over the keys a query may see, are zero elsewhere, and, applied
    to the values, give what SDPA gives: the logits are unchanged."""
    model = tiny_gpt(sliding_window=5)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        plain = model(ids)[0]
        logits, _, extras = model(ids, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    att = extras["attentions"]
    assert len(att) == 2 and att[0].shape == (2, 4, 12, 12)
    for p in att:
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
        assert torch.all(p.triu(diagonal=1) == 0)  # nothing from the future
    hs = extras["hidden_states"]
    assert len(hs) == 3
    with torch.no_grad():
        torch.testing.assert_close(hs[-1], model(ids, return_hidden=True)[0])


def test_attention_probabilities_in_a_decoding_step_over_slots():
    from lmforge.engine import KVCache

    model = tiny_gpt()
    seqs = [torch.randint(0, 96, (n,)) for n in (7, 3)]
    cache = KVCache(model.config, 3, 16, "cpu")
    with torch.no_grad():
        for s, seq in zip((2, 0), seqs):
            model(seq[None, :-1], cache=cache.view([s]))
        step = torch.stack([seq[-1:] for seq in seqs])
        logits, _, extras = model(step, cache=cache.view([2, 0]), output_attentions=True)
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(logits[b], model(seq[None])[0][0, -1:], atol=1e-5, rtol=1e-5)
    p = extras["attentions"][0]  # (2, nh, 1, S): row 1 has 3 keys, the rest are zero
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 1))
    assert torch.all(p[1, :, :, 3:] == 0) and torch.all(p[1, :, :, :3] > 0)


def test_bad_requests_are_refused():
    from lmforge.errors import LMForgeError

    for kw in ({"prompt": []}, {"prompt": [1], "max_new_tokens": 0}, {"prompt": None},
               {"prompt": [1], "stop_strings": ["x"]}, {"prompt": [1], "top_logprobs": -1}):
        with pytest.raises(LMForgeError):
            Request(**kw)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("variant", ["avx512", "avx2", "generic"])
def test_the_one_call_decoding_step_equals_the_modules(variant, scheme, monkeypatch):
    """lmf_decode_layers (every layer in one C call) against the same layers run module by
    module, in each kernel build this CPU runs, over rows at their own positions and slots;
    and the engine's tokens with it equal the engine's tokens without it."""
    from lmforge.engine import KVCache
    from lmforge.models import kernels
    from lmforge.models.quant import quantize_model

    if not kernels.runnable(variant):
        pytest.skip(f"this CPU cannot run the {variant} build")
    monkeypatch.setenv("LMFORGE_KERNELS", variant)
    assert kernels.library() is not None, "the kernels must build where a compiler exists"
    model = tiny_gpt(sliding_window=6, qk_norm=True, post_norms=True, mlp_hidden=96)
    quantize_model(model, scheme)
    seqs = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 3, 14)]

    def step(fused: bool):
        cache = KVCache(model.config, 5, 20, "cpu")
        with torch.no_grad():
            for s, seq in zip((4, 0, 2), seqs):
                model(seq[None, :-1], cache=cache.view([s]))
            model.invalidate_plan()
            if not fused:
                model._plan = False  # (what an unsupported model gets: the module path)
            out = model(torch.stack([q[-1:] for q in seqs]), cache=cache.view([4, 0, 2]))[0]
        model.invalidate_plan()
        return out, cache

    (a, ca), (b, cb) = step(True), step(False)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(ca.k, cb.k, atol=1e-5, rtol=1e-5)  # the same keys written to the same slots
    assert model._decode_plan(torch.zeros(1, dtype=torch.float32)) is not None  # it did take the C step
    prompts = [q.tolist() for q in seqs]
    model._decode_plan(torch.zeros(1)).prefill_rows = 0  # the prompts as in the other arm: only the steps differ
    with_plan = [solo(model, p, 10) for p in prompts]
    model._plan = False
    without = [solo(model, p, 10) for p in prompts]
    model.invalidate_plan()
    assert with_plan == without


def dequantized(model):
    """A copy of a quantized model with float nn.Linear layers holding the weights its integers
    stand for, on PyTorch's float32 path: the reference the C step's arithmetic is held to."""
    import copy

    from lmforge.models.quant import Int4Linear, Int8Linear

    ref = copy.deepcopy(model)
    for m in list(ref.modules()):
        for name, c in list(m.named_children()):
            if isinstance(c, (Int8Linear, Int4Linear)):
                lin = nn.Linear(c.in_features, c.out_features, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(c.float_weight())
                setattr(m, name, lin)
    ref._plan = False
    return ref


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("variant", ["avx512", "avx2", "generic"])
def test_a_prompt_through_the_one_call_step_equals_the_float_layers(variant, scheme, monkeypatch):
    """A prompt's positions as rows of one slot in lmf_decode_layers (two chunks: the second
    sees the first's keys in the cache and its own earlier rows, in layers with a sliding window
    shorter than the prompt) give the logits and keys of the same weights in float32 without a
    cache: exactly where the build keeps float activations (plain C; AVX-512's 4-bit tile),
    within int16 rounding of each row (int8 layers on x86) or int8 rounding of groups (AVX2's
    4-bit tile); and the engine's tokens after it equal those of the module path's prompt."""
    from lmforge.engine import KVCache
    from lmforge.models import kernels
    from lmforge.models.quant import quantize_model

    if not kernels.runnable(variant):
        pytest.skip(f"this CPU cannot run the {variant} build")
    monkeypatch.setenv("LMFORGE_KERNELS", variant)
    lib = kernels.library()
    assert lib is not None, "the kernels must build where a compiler exists"
    model = tiny_gpt(sliding_window=6, qk_norm=True, post_norms=True, mlp_hidden=96)
    quantize_model(model, scheme)
    ref = dequantized(model)
    seq = torch.randint(0, 96, (1, 14), generator=torch.Generator().manual_seed(5))

    def prompt(rows: int):
        cache = KVCache(model.config, 3, 20, "cpu")
        model.invalidate_plan()
        model._decode_plan(torch.zeros(1)).prefill_rows = rows
        with torch.no_grad():
            logits = torch.cat([model(seq[:, :5], cache=cache.view([1]))[0],
                                model(seq[:, 5:], cache=cache.view([1]))[0]], 1)  # (1, 14, V)
        return logits, cache

    with torch.no_grad():
        want = ref(seq)[0]
    got, cache = prompt(1 << 20)
    # float activations (plain C; AVX-512's 4-bit tile): rounding only; int16 rows (int8 layers
    # on x86): 15 bits per row; AVX2's 4-bit tile: int8 groups
    rel = 1e-4 if lib.lmf_isa() == 0 or (lib.lmf_isa() == 2 and scheme == "int4") else 5e-3 if scheme == "int8" else 3e-2
    assert (got - want).abs().max() <= rel * want.abs().max()
    _, mod_cache = prompt(0)  # the module path writes the same keys to the same slot
    assert (cache.k[:, 1] - mod_cache.k[:, 1]).abs().max() <= max(rel, 1e-2) * mod_cache.k.abs().max()
    assert cache.lengths == [0, 14, 0] and cache.k[:, [0, 2]].abs().max() == 0
    # the default: int8 layers take the C step on a prompt where it is faster (not the plain-C build)
    model.invalidate_plan()
    rows = model._decode_plan(torch.zeros(1)).prefill_rows
    assert rows == kernels.prompt_rows(lib, {1 if scheme == "int8" else 2})
    assert (rows > 0) == (lib.lmf_isa() > 0 and (scheme == "int8" or lib.lmf_isa() == 2))
    model._plan = False
    without = solo(model, seq[0].tolist(), 8)
    model.invalidate_plan()
    model._decode_plan(torch.zeros(1)).prefill_rows = 1 << 20
    assert solo(model, seq[0].tolist(), 8) == without
    model.invalidate_plan()


def test_a_started_engine_serves_threads_and_equals_solo_runs():
    """Started, the engine steps in its own thread: requests run from many threads at once (each
    through the blocking `run`) come out as each one alone; a consumer that stops early cancels
    its request, freeing the slot."""
    import threading

    model = tiny_gpt()
    rng = random.Random(3)
    prompts = [[rng.randrange(96) for _ in range(rng.randrange(1, 20))] for _ in range(8)]
    n_new = [rng.randrange(2, 16) for _ in prompts]
    want = [solo(model, p, n) for p, n in zip(prompts, n_new)]
    eng = Engine(model, max_slots=4)
    eng.start()
    try:
        got = [None] * len(prompts)

        def one(i):
            got[i] = [ev.token for ev in eng.run([Request(prompts[i], n_new[i], GREEDY)]) if ev.token is not None]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want
        events = eng.run([Request(prompts[0], 200, GREEDY)])
        next(events)
        assert eng.active == 1
        events.close()  # (left early)
        for _ in range(200):
            if eng.active == 0:
                break
            threading.Event().wait(0.01)
        assert eng.active == 0 and eng.waiting == 0
    finally:
        eng.stop()
    assert eng._driver is None


def test_a_failed_step_ends_its_requests_with_an_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_gpt().config
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, *a, **kw):
            raise RuntimeError("boom")

    eng = Engine(Broken())
    eng.start()
    try:
        from lmforge.errors import LMForgeError

        with pytest.raises(LMForgeError, match="boom"):
            list(eng.run([Request([1, 2, 3], 4, GREEDY)]))
        assert eng.active == 0
    finally:
        eng.stop()
