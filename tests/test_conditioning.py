"""Sizing a conditioning run: distinct tokens per batch, the tabulation's tokens, the batch, the plan."""

import itertools
import math

import pytest

from lmcoh.lm.conditioning import expected_distinct_tokens, plan_conditioning, prefix_tokens, sized_batch
from lmcoh.lm.cost import TOKEN_OVERHEAD_S, ModelShape, TrainingCost, gemm_rate
from lmcoh.lm.pretrain import PretrainConfig
from lmcoh.lm.text import Layout


def data(lengths_and_counts):
    """Examples: each distinct transcript (its length) repeated its count of times."""
    out = []
    for i, (length, count) in enumerate(lengths_and_counts):
        out += [([i] * length, [1] * length)] * count
    return out


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_expected_distinct_tokens_is_the_mean_over_every_batch(batch):
    examples = data([(3, 1), (5, 2), (2, 4), (7, 1)])
    batches = list(itertools.combinations(range(len(examples)), batch))
    brute = sum(sum(map(len, {tuple(examples[i][0]) for i in b})) for b in batches) / len(batches)
    assert expected_distinct_tokens(examples, batch) == pytest.approx(brute)


def test_prefix_tokens_counts_shared_prefixes_once():
    assert prefix_tokens([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3]]) == 5
    assert prefix_tokens([[1, 2], [1, 2, 3]]) == 3
    assert prefix_tokens([]) == 0


def test_sized_batch_is_the_largest_that_fits_the_token_budget():
    examples = data([(10, 40), (12, 30), (8, 20)] + [(20, 1)] * 30)
    for budget in (60, 150, 400):
        b = sized_batch(examples, 1, budget, least=1)
        assert expected_distinct_tokens(examples, b) <= budget < expected_distinct_tokens(examples, b + 1)
    assert sized_batch(examples, 1, 1, least=16) == 16  # never below the least
    assert sized_batch(data([(10, 100)]), 1, 400) == 100  # one transcript: the whole data set
    assert sized_batch(examples, 3, 400) % 3 == 0


def test_plan_checks_often_enough_and_estimates_the_cost():
    examples = data([(60, 500), (62, 500), (61, 500)])
    goals = ["success"] * 500 + ["failure"] * 500
    smol = ModelShape(135_000_000, 576, 30)
    assert smol.step_tokens() == pytest.approx(1024, rel=0.01)  # FLOPs bound it, not memory
    assert ModelShape(1_200_000, 128, 4).step_tokens() == pytest.approx(1.5e9 / (80 * 128 * 4))  # memory does
    plan = plan_conditioning(PretrainConfig(max_steps=100).resolved(True), examples, goals, smol, 1)
    assert plan["batch_size"] == len(examples) and plan["distinct"] == 3 and plan["max_steps"] == 100
    cost = plan["cost"]
    assert cost.tokens_per_step == pytest.approx(183) and cost.check_tokens == 2 * (60 + 61)  # nothing shared
    assert cost.checks == math.ceil(100 / plan["check_every"])
    assert plan["estimate"]["max_flops"] == pytest.approx(135e6 * (4 * 183 * 100 + 2 * 242 * cost.checks))
    assert cost.check_seconds(100.0) <= 0.1 * plan["check_every"] * cost.step_seconds(100.0)  # a tenth of the time
    epochs = plan_conditioning(PretrainConfig(epochs=2, batch_size=100).resolved(True), examples, goals, smol, 1)
    assert epochs["max_steps"] == 2 * 1500 // 100


def test_training_cost():
    cost = TrainingCost(parameters=10**8, tokens_per_step=1000, steps=10, check_tokens=500, checks=2)
    assert cost.tokens == 10_000 and cost.flops == 10**8 * (4 * 10_000 + 2 * 500 * 2)
    assert cost.seconds(100.0) == pytest.approx(10 * cost.step_seconds(100.0) + 2 * cost.check_seconds(100.0)
                                                + TOKEN_OVERHEAD_S * (10_000 + 500))
    assert cost.step_seconds(200.0) < cost.step_seconds(100.0)
    assert gemm_rate(seconds=0.01) > 0


@pytest.mark.parametrize("tied", [True, False])
def test_a_check_merges_the_trained_rows_and_restores_the_weights_exactly(tied, llama_tokenizer, mountain):
    """The oracle's check tabulates with peft's trainable-token layers merged: the same policy as unmerged,
    and afterwards the same weights, bit for bit."""
    import torch

    from lmcoh.lm.conditioning import conditioning_tv, tokens_merged
    from test_training import conditioned

    lm, new = conditioned("llama", llama_tokenizer, tied)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # trained rows that differ from the original ones
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plain = conditioning_tv(lm, mountain, Layout())
    with tokens_merged(lm.model):
        merged = conditioning_tv(lm, mountain, Layout())
    assert merged == pytest.approx(plain, abs=1e-6)
    after = lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
