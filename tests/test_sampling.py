import pytest
import torch

from lmforge.engine.sampling import SamplingParams, ban_tokens, sample_next, top_k_filter, top_p_filter
from lmforge.errors import LMForgeError


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).sum() == 2
    assert torch.isfinite(out[0, [1, 3]]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    # the most likely token always survives
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1


def test_greedy_and_banned_tokens():
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    assert sample_next(logits, SamplingParams(temperature=0)).item() == 1
    assert sample_next(ban_tokens(logits, [1]), SamplingParams(temperature=0)).item() == 2


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, SamplingParams(temperature=1.0), g)
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    assert torch.allclose(freq, torch.tensor([0.2, 0.3, 0.5]), atol=0.03)


def test_low_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.4, 0.6]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, SamplingParams(temperature=0.1), g)
    assert ids.float().mean() > 0.95


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_params(kw):
    with pytest.raises(LMForgeError):
        SamplingParams(**kw)


def test_min_p_keeps_tokens_near_the_top():
    from lmforge.engine.sampling import min_p_filter

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(min_p_filter(logits, 0.2))  # threshold 0.1
    assert kept.tolist() == [[True, True, True, False]]


def test_repetition_penalty_pushes_seen_tokens_down():
    from lmforge.engine.sampling import repetition_penalty

    logits = torch.tensor([[2.0, -1.0, 3.0]])
    out = repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0]]
    assert repetition_penalty(logits, [0], 1.0) is logits


def test_greedy_matches_torch_argmax_with_ties():
    from lmforge.engine.sampling import greedy

    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 5, (4, 1000), generator=g).float()  # many ties: the first maximum wins
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert greedy(logits).dtype == torch.int64 and greedy(logits[:1]).shape == (1,)
    assert torch.equal(greedy(logits.bfloat16()), logits.bfloat16().argmax(-1))  # non-float32: torch's own
    assert greedy(logits[0]).item() == logits[0].argmax().item()  # 1-D logits too


def test_presence_and_frequency_penalties_count_the_output_only():
    from lmforge.engine.sampling import presence_frequency_penalty

    logits = torch.zeros(1, 5)
    out = presence_frequency_penalty(logits, [1, 1, 1, 3], presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -1.25, 0.0, -0.75, 0.0]]  # 3 x 0.25 + 0.5; 1 x 0.25 + 0.5
    assert presence_frequency_penalty(logits, [], 1.0, 1.0) is logits
    with pytest.raises(LMForgeError):
        SamplingParams(presence_penalty=3.0)
