import math

import pytest
import torch

from vist2.engine.sampling import Sampler, SamplingParams

NEG_INF = float("-inf")


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5])
    sampler = Sampler(SamplingParams())
    assert sampler(logits, history=[1, 1, 1]) == 1  # no repetition processors by default
    assert torch.equal(sampler.processed(logits, [1]), logits)


def test_does_not_modify_callers_logits_and_accepts_half_precision():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    before = logits.clone()
    sampler = Sampler(SamplingParams(repetition_penalty=2.0, no_repeat_ngram_size=2))
    sampler(logits, [3, 1, 3])
    assert torch.equal(logits, before)
    assert sampler(logits.to(torch.bfloat16), [3]) == 0  # 3.0 / 2 = 1.5 < 2.0
    assert sampler(logits, torch.tensor([3])) == 0  # history may be a tensor


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_top_k_1_with_temperature_equals_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1000, generator=g)
    greedy = Sampler(SamplingParams())(logits, [])
    sampler = Sampler(SamplingParams(temperature=1.3, top_k=1, seed=seed))
    assert [sampler(logits, []) for _ in range(10)] == [greedy] * 10
    kept = torch.isfinite(sampler.processed(logits, [])).nonzero().flatten().tolist()
    assert kept == [greedy]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = Sampler(SamplingParams(temperature=1.0, top_k=3)).processed(logits, [])
    assert out.tolist() == [NEG_INF, 5.0, 3.0, 4.0, NEG_INF]


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.4, [0]),  # 0.5 alone already covers 0.4
        (0.7, [0, 1]),  # 0.5 + 0.3 = 0.8 >= 0.7
        (0.85, [0, 1, 3]),  # 0.5 + 0.3 + 0.15 = 0.95 >= 0.85
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.05, 0.15])
    logits = probs.log()
    out = Sampler(SamplingParams(temperature=1.0, top_p=top_p)).processed(logits, [])
    assert torch.isfinite(out).nonzero().flatten().tolist() == kept
    assert torch.equal(out[kept], logits[kept])  # survivors are untouched
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=0))
    assert {sampler(logits, []) for _ in range(200)} <= set(kept)


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, -2.0, 4.0])
    out = Sampler(SamplingParams(temperature=0.5)).processed(logits, [])
    assert out.tolist() == [2.0, -4.0, 8.0]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [0.25, 0.75]
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1234))
    draws = [sampler(logits, []) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.75) < 0.03  # ~5 standard deviations


def test_repetition_penalty_hf_rule():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    # seen tokens 0 (positive: divided) and 1 (negative: multiplied); repeats in history count once
    out = sampler.processed(logits, [0, 1, 0])
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert sampler(torch.tensor([3.0, 2.0, 0.0]), [0]) == 1  # 3 / 2 = 1.5 < 2
    # a penalty below 1 rewards repetition
    out = Sampler(SamplingParams(repetition_penalty=0.5)).processed(logits, [1, 3])
    assert out.tolist() == [2.0, -0.5, 0.5, 6.0]


def test_no_repeat_ngram_blocks_the_token_that_repeats_a_bigram():
    history = [5, 7, 9, 5]  # the bigram (5, 7) exists; the last token is 5
    logits = torch.zeros(10)
    logits[7] = 10.0
    logits[9] = 5.0
    sampler = Sampler(SamplingParams(no_repeat_ngram_size=2))
    out = sampler.processed(logits, history)
    assert out[7] == NEG_INF
    assert torch.isfinite(out).sum() == 9
    assert sampler(logits, history) == 9
    assert sampler(logits, [5, 7, 9]) == 7  # (9, 7) was never seen


def test_no_repeat_ngram_trigram():
    history = [1, 2, 3, 4, 1, 2]
    out = Sampler(SamplingParams(no_repeat_ngram_size=3)).processed(torch.zeros(6), history)
    assert torch.isinf(out).nonzero().flatten().tolist() == [3]
    # also with sampling, after the warpers
    out = Sampler(SamplingParams(no_repeat_ngram_size=3, temperature=0.7, top_k=5)).processed(
        torch.arange(6.0), history
    )
    assert out[3] == NEG_INF


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    flat = torch.zeros(1000)
    params = dict(temperature=1.0, top_p=0.95, repetition_penalty=1.1)

    def draw(seed):
        sampler = Sampler(SamplingParams(seed=seed, **params))
        history = [1, 2, 3]
        for _ in range(20):
            history.append(sampler(flat, history))
        return history[3:]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert len(set(draw(7))) > 10  # a flat distribution really is sampled


def test_unseeded_samplers_differ():
    flat = torch.zeros(1000)
    a, b = Sampler(SamplingParams(temperature=1.0)), Sampler(SamplingParams(temperature=1.0))
    assert [a(flat, []) for _ in range(10)] != [b(flat, []) for _ in range(10)]


def test_defaults_validate():
    params = SamplingParams()
    assert params.validate() is params
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=3, repetition_penalty=1.2,
                   no_repeat_ngram_size=4, stop=["\n\n"], stop_token_ids=[151645]).validate()


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_k", -1),
        ("top_k", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("no_repeat_ngram_size", -1),
        ("stop", "\n\n"),  # a bare string, not a sequence of strings
        ("stop", ("ok", "")),
        ("stop", ("ok", 3)),
        ("stop", 5),
        ("stop_token_ids", (1, -2)),
        ("seed", 1.5),
    ],
)
def test_bad_field_raises_value_error_naming_it(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()
    with pytest.raises(ValueError, match=field):
        Sampler(params)


def test_logits_must_be_1d():
    with pytest.raises(ValueError, match="logits_V"):
        Sampler(SamplingParams())(torch.zeros(1, 5), [])
