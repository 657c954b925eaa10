import shutil

import pytest
import torch

from lmforge.config import ModelConfig, preset
from lmforge.engine import Engine, SamplingParams, generate_naive
from lmforge.engine.cache import make_cache
from lmforge.models import build_model, count_params

FAMILIES = ["rnn", "gru", "lstm", "gpt"]


def tiny(family: str, **kw) -> ModelConfig:
    m, _ = preset("tiny", family)
    m.update(vocab_size=40, **kw)
    return ModelConfig(**m)


GPT_VARIANTS = {
    "gpt2-style": dict(),
    "llama-style": dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_head=4, n_kv_head=2),
    "biased-untied": dict(bias=True, tie_embeddings=False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_and_loss(family):
    model = build_model(tiny(family))
    idx = torch.randint(0, 40, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 40)
    # an untrained model is close to uniform: loss near ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(40.0)).item()) < 0.5
    assert count_params(model) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_overfits_a_tiny_batch(family):
    torch.manual_seed(0)
    model = build_model(tiny(family))
    x = torch.randint(0, 40, (4, 24))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0
    assert loss.item() < 0.3, f"{family} failed to memorise a batch: {loss.item():.3f}"


@pytest.mark.parametrize("variant", GPT_VARIANTS)
def test_gpt_variants_overfit(variant):
    model = build_model(tiny("gpt", **GPT_VARIANTS[variant]))
    x = torch.randint(0, 40, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        _, loss = model(x, torch.roll(x, -1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3


def _trained_ish(cfg: ModelConfig) -> torch.nn.Module:
    """Random weights with a larger scale, so greedy decoding is not one repeated token."""
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_uncached_greedy(family):
    model = _trained_ish(tiny(family))
    prompt = [1, 5, 9, 2, 7]
    greedy = SamplingParams(temperature=0.0)
    # 60 new tokens: longer than the tiny gpt's 32-token context, so the window slides too
    cached = list(Engine(model).generate(prompt, 60, greedy))
    naive = generate_naive(model, prompt, 60, greedy)
    assert cached == naive
    assert len(set(cached)) > 3


@pytest.mark.parametrize("variant", GPT_VARIANTS)
def test_cached_equals_uncached_gpt_variants(variant):
    model = _trained_ish(tiny("gpt", **GPT_VARIANTS[variant]))
    greedy = SamplingParams(temperature=0.0)
    assert list(Engine(model).generate([3, 4], 25, greedy)) == generate_naive(model, [3, 4], 25, greedy)


def test_seeded_sampling_is_reproducible_and_matches_naive():
    model = _trained_ish(tiny("gpt"))
    params = SamplingParams(temperature=1.0, top_k=10, seed=123)
    a = list(Engine(model).generate([1, 2, 3], 20, params))
    b = list(Engine(model).generate([1, 2, 3], 20, params))
    assert a == b == generate_naive(model, [1, 2, 3], 20, params)


@pytest.mark.parametrize("variant", ["gpt2-style", "llama-style"])
def test_chunked_prefill_matches_full_forward(variant):
    """Feeding a sequence through the KV cache in chunks gives the full forward's logits."""
    cfg = tiny("gpt", **GPT_VARIANTS[variant])
    model = _trained_ish(cfg)
    idx = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = make_cache(cfg, 2, 20, "cpu")
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2-style", "llama-style"])
def test_last_only_equals_the_full_forwards_last_position(variant):
    """last_only stops the final block at the last position: same logits as the full forward,
    with and without a cache, after earlier chunks, and with a sliding window."""
    cfg = tiny("gpt", **GPT_VARIANTS[variant], sliding_window=6 if variant == "llama-style" else None)
    model = _trained_ish(cfg)
    idx = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        torch.testing.assert_close(model(idx, last_only=True)[0], full[:, -1:], atol=1e-5, rtol=1e-5)
        cache = make_cache(cfg, 2, 20, "cpu")
        model(idx[:, :12], cache=cache)
        torch.testing.assert_close(model(idx[:, 12:], cache=cache, last_only=True)[0], full[:, -1:],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2-style", "llama-style"])
@pytest.mark.parametrize("kernels_on", [True, False])
def test_a_decoding_step_over_rows_at_their_own_positions(variant, kernels_on, monkeypatch):
    """One token per row, each row at its own length in its own (non-adjacent) cache slot, as
    continuous batching runs them: every row's logits are its own full forward's last
    position, through the C kernel and through PyTorch's path."""
    from lmforge.engine import KVCache
    from lmforge.models import kernels

    if not kernels_on:
        monkeypatch.setenv("LMFORGE_KERNELS", "0")
    elif not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the kernel path cannot be built here")
    else:
        assert kernels.library() is not None, "the C kernels failed to build where a compiler exists"
    cfg = tiny("gpt", **GPT_VARIANTS[variant], sliding_window=6 if variant == "llama-style" else None)
    model = _trained_ish(cfg)
    seqs = [torch.randint(0, 40, (n,)) for n in (9, 3, 14)]
    cache = KVCache(cfg, 5, 20, "cpu")
    slots = [4, 0, 2]
    with torch.no_grad():
        for s, seq in zip(slots, seqs):  # prefill each row alone, all but its last token
            model(seq[None, :-1], cache=cache.view([s]))
        step = torch.stack([seq[-1:] for seq in seqs])  # (3, 1)
        out = model(step, cache=cache.view(slots))[0]  # (3, 1, V)
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(out[b], model(seq[None])[0][0, -1:], atol=1e-5, rtol=1e-5)
    assert [cache.lengths[s] for s in slots] == [9, 3, 14]


@pytest.mark.parametrize("family", ["rnn", "gru", "lstm"])
def test_recurrent_state_carries_history(family):
    cfg = tiny(family)
    model = _trained_ish(cfg)
    idx = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        full, _ = model(idx)
        state = make_cache(cfg, 2, 30, "cpu")
        parts = [model(idx[:, a:b], cache=state)[0] for a, b in ((0, 10), (10, 11), (11, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_learned_positions_reject_overlong_input():
    model = build_model(tiny("gpt"))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_small_presets_are_about_one_million_parameters():
    for family in FAMILIES:
        m, _ = preset("small", family)
        n = count_params(build_model(ModelConfig(**m, vocab_size=100)), exclude_embeddings=True)
        assert 0.7e6 < n < 1.2e6, (family, n)


@pytest.mark.parametrize("variant", ["gpt2-style", "llama-style"])
def test_batched_generation_equals_one_prompt_at_a_time(variant):
    model = _trained_ish(tiny("gpt", **GPT_VARIANTS[variant]))
    prompts = [[1, 5, 9, 2, 7, 3, 3], [4], [8, 8, 1]]
    greedy = SamplingParams(temperature=0)
    batched = Engine(model).generate_batch(prompts, 12, greedy)
    single = [list(Engine(model).generate(p, 12, greedy)) for p in prompts]
    assert batched == single


@pytest.mark.parametrize("family", ["gru", "gpt"])
def test_batched_generation_of_recurrent_models_and_full_windows(family):
    """Recurrent models (a state per slot), and learned positions past their window (re-encoded
    row by row), still give what one prompt at a time gives."""
    model = _trained_ish(tiny(family))
    prompts = [[1, 2, 3], [4, 5]]
    greedy = SamplingParams(temperature=0)
    batched = Engine(model).generate_batch(prompts, 40, greedy)
    assert batched == [generate_naive(model, p, 40, greedy) for p in prompts]


def test_compiled_engine_generates_what_the_eager_one_does():
    """Engine(compile=True) runs the model through torch.compile (inductor: needs a C++
    compiler); greedy tokens of a quantized llama-style model must not change."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    from lmforge.models.quant import quantize_model

    model = quantize_model(_trained_ish(tiny("gpt", **GPT_VARIANTS["llama-style"])), "int8")
    greedy = SamplingParams(temperature=0)
    compiled = Engine(model, compile=True)
    assert compiled.compiled
    assert list(compiled.generate([1, 2, 3], 12, greedy)) == list(Engine(model).generate([1, 2, 3], 12, greedy))


@pytest.mark.parametrize("family", ["gpt", "gru"])
def test_continuation_logprobs_match_the_full_forward(family):
    """Engine.continuation_logprobs (the LLM reranker's score) right-pads a batch and projects
    only the scored positions; every pair must get what one full forward of it gives."""
    model = _trained_ish(tiny(family, **(GPT_VARIANTS["llama-style"] if family == "gpt" else {})))
    pairs = [([1, 5, 9, 2], [7, 3, 3]), ([4], [8]), ([8, 8, 1, 2, 2, 2], [5, 6])]
    got = Engine(model).continuation_logprobs(pairs, batch=2)
    for (p, c), value in zip(pairs, got):
        with torch.inference_mode():
            logp = model(torch.tensor([p + c]))[0][0].float().log_softmax(-1)  # (T, V)
        want = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))
        assert value == pytest.approx(want, abs=1e-4)
