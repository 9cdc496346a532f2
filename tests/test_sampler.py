"""Sampler: greedy, temperature/top-k/top-p, seeds, penalties, banned tokens."""

import pytest
import torch

from llmserve.engine.config import SamplingParams
from llmserve.engine.sampler import Sampler, apply_penalties, banned_tokens
from llmserve.engine.sequence import Sequence

VOCAB = 50


def seq(prompt=(1, 2, 3), output=(), stop_ids=(0,), bad_words=(), **params):
    s = Sequence("r", list(prompt), SamplingParams(max_tokens=100, **params), stream=True,
                 stop_ids=frozenset(stop_ids), bad_word_ids=[list(w) for w in bad_words])
    for t in output:
        s.append(t)
    return s


def logits(rows, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    x = logits(3)
    assert Sampler()(x.clone(), [seq(), seq(), seq()]) == x.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    x = logits(1)
    alone = [Sampler()(x.clone(), [seq(temperature=1.0, seed=7)])[0] for _ in range(1)]
    other = logits(5, seed=3)
    batch = torch.cat([other[:2], x, other[2:]])
    seqs = [seq(temperature=0.8), seq(), seq(temperature=1.0, seed=7), seq(temperature=1.3), seq()]
    assert Sampler()(batch.clone(), seqs)[2] == alone[0]
    # And a whole run of draws repeats with the same seed.
    run = lambda: [Sampler()(x.clone(), [s])[0] for s in [seq(temperature=1.0, seed=11)] for _ in range(20)]
    assert run() == run()


def test_top_k_one_is_greedy_and_top_k_limits_choices():
    x = logits(1)
    s = seq(temperature=5.0, top_k=1, seed=1)
    assert {Sampler()(x.clone(), [s])[0] for _ in range(30)} == {int(x.argmax())}
    s = seq(temperature=5.0, top_k=3, seed=2)
    allowed = set(x[0].topk(3).indices.tolist())
    assert {Sampler()(x.clone(), [s])[0] for _ in range(100)} <= allowed


def test_top_p_keeps_the_nucleus():
    x = torch.full((1, VOCAB), -10.0)
    x[0, 4], x[0, 9], x[0, 20] = 5.0, 4.0, 0.0  # ~0.73, ~0.27, ~0.005
    s = seq(temperature=1.0, top_p=0.5, seed=3)
    assert {Sampler()(x.clone(), [s])[0] for _ in range(50)} == {4}
    s = seq(temperature=1.0, top_p=0.9, seed=4)
    assert {Sampler()(x.clone(), [s])[0] for _ in range(200)} == {4, 9}


def test_sampling_follows_the_distribution():
    x = torch.full((1, VOCAB), -30.0)
    x[0, 1], x[0, 2] = 0.0, 0.0
    s = seq(temperature=1.0, seed=5)
    draws = [Sampler()(x.clone(), [s])[0] for _ in range(400)]
    assert set(draws) == {1, 2} and 140 < draws.count(1) < 260


def test_repetition_penalty_lowers_seen_tokens():
    s = seq(prompt=(5,), output=(7,), repetition_penalty=2.0)
    row = torch.zeros(VOCAB)
    row[5], row[7], row[8] = 4.0, -1.0, 4.0
    apply_penalties(row, s)
    assert row[5] == 2.0 and row[7] == -2.0 and row[8] == 4.0


def test_presence_and_frequency_penalties_count_output_tokens():
    s = seq(prompt=(5,), output=(7, 7, 8), presence_penalty=0.5, frequency_penalty=0.25)
    row = torch.zeros(VOCAB)
    apply_penalties(row, s)
    assert row[5] == 0.0
    assert row[7] == pytest.approx(-0.5 - 0.5)
    assert row[8] == pytest.approx(-0.5 - 0.25)
    s.append(8)  # counts follow appended tokens
    row = torch.zeros(VOCAB)
    apply_penalties(row, s)
    assert row[8] == pytest.approx(-0.5 - 0.5)


def test_eos_banned_before_min_tokens_and_bad_words():
    s = seq(output=(3,), stop_ids=(0,), min_tokens=2, bad_words=[(9,), (3, 4)])
    assert sorted(banned_tokens(s)) == [0, 4, 9]
    s.append(5)
    assert sorted(banned_tokens(s)) == [9]
    x = torch.zeros(1, VOCAB)
    x[0, 9] = 10.0
    assert Sampler()(x, [s])[0] != 9
