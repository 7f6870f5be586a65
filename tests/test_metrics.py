"""Token-level incoherence adds up to state-level incoherence; the evaluate report."""

import json
import math

import numpy as np
import pytest

from conftest import tiny_gpt2, tiny_llama
from lmcoh.io import dumps
from lmcoh.lm import metrics, scoring
from lmcoh.oracle import exact
from lmcoh.lm.tabulate import LMPolicy


def kl(p, q):
    return float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)))


def test_token_terms_chain_rule_on_a_shared_prefix_trie():
    # "climb the ridge" / "climb down" / "climb the wall" / "rest": shared prefixes at two depths
    tokens = [(1, 2, 3, 9), (1, 4, 9), (1, 2, 5, 9), (6, 9), (1, 9)]  # 9 = <eoa>; "climb" alone too
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))
        terms = metrics.token_terms(tokens, p, q)
        assert len(terms) == 4 and terms[3] == 0.0
        assert sum(terms) == pytest.approx(kl(p, q), abs=1e-12)
    # position 0 alone: the choice between "climb ..." and "rest"
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    q = np.array([0.25, 0.25, 0.25, 0.25, 0.0])
    terms = metrics.token_terms(tokens, p, q)
    assert terms[0] == pytest.approx(0.6 * math.log(0.6 / 0.75) + 0.4 * math.log(0.4 / 0.25))
    assert terms[1] == pytest.approx(0.4 * math.log((0.4 / 0.6) / (0.5 / 0.75))
                                     + 0.2 * math.log((0.2 / 0.6) / (0.25 / 0.75)))
    # mass where the target has none: infinite at the first token that leaves the target's support
    terms = metrics.token_terms(tokens, np.array([0.5, 0.5, 0, 0, 0]), np.array([0, 0.5, 0.5, 0, 0]))
    assert terms[0] == 0.0 and terms[1] == 0.0 and math.isinf(terms[2])


def random_policy(task, rng):
    return [np.concatenate([rng.dirichlet(np.ones(n)) for n in np.diff(layer.start)])
            for layer in task.layers]


@pytest.mark.parametrize("fixture", ["trie_task", "expedition", "ring"])
def test_token_incoherence_adds_up_to_state_incoherence(fixture, request):
    task = request.getfixturevalue(fixture)
    tokens = scoring.Codec(tiny_gpt2(task).tokenizer, task).action_tokens
    rng = np.random.default_rng(1)
    for _ in range(5):
        pi = random_policy(task, rng)
        tok = metrics.token_incoherence(task, pi, tokens, delta=0.7)
        assert tok["total"] == pytest.approx(exact.incoherence(task, pi, 0.7), abs=1e-6)
        assert sum(tok["by_position"]) == pytest.approx(tok["total"], abs=1e-6)
    if fixture == "trie_task":
        # the choice is spread over several tokens: "climb" vs "rest", then "the" vs "down",
        # then "ridge" vs "wall"
        assert sum(x > 1e-9 for x in tok["by_position"]) >= 3


def test_token_incoherence_is_inf_where_state_incoherence_is(mountain):
    tokens = scoring.Codec(tiny_llama(mountain).tokenizer, mountain).action_tokens
    prior = exact.prior_policy(mountain)
    tok = metrics.token_incoherence(mountain, prior, tokens)
    assert math.isinf(tok["total"]) and math.isinf(exact.incoherence(mountain, prior))
    # word-level actions: everything happens at the first token, "<eoa>" adds nothing
    g = exact.goal_condition(mountain, prior)
    tok = metrics.token_incoherence(mountain, g, tokens)
    assert tok["by_position"][1] == 0.0
    assert tok["by_position"][0] == pytest.approx(exact.incoherence(mountain, g), abs=1e-12)


def test_report_for_an_exact_policy(mountain):
    tokens = scoring.Codec(tiny_llama(mountain).tokenizer, mountain).action_tokens
    g1 = exact.goal_condition(mountain, exact.prior_policy(mountain))
    lm = LMPolicy(g1, exact.occupancy(mountain, g1), 3, True, exact.success(mountain, g1), 0.0, tokens)
    out = metrics.report(mountain, lm, "success")
    assert out["success"] == pytest.approx(17 / 20)
    assert out["policy"]["start"]["up"] == pytest.approx(2 / 5)
    assert out["tv_to_retrain"][1] == pytest.approx(0.0, abs=1e-12)
    # start: |2/5 - 1/2| = 0.1 (visit 1); ridge: 1/2 (visit 2/5); forest: 0; weights sum to 2
    assert out["tv_to_retrain"][0] == pytest.approx((0.1 + 0.4 * 0.5) / 2)
    assert out["incoherence"] == pytest.approx(exact.incoherence(mountain, g1))
    assert out["token_incoherence"]["total"] == pytest.approx(out["incoherence"])
    prior = exact.prior_policy(mountain)
    lm = LMPolicy(prior, exact.occupancy(mountain, prior), 3, True, 5 / 8, 0.0, tokens)
    out = metrics.report(mountain, lm, "none")
    assert out["incoherence"] == math.inf and out["return"] == -math.inf
    assert out["token_incoherence"]["total"] == math.inf
    assert out["incoherence_finite_part"] == pytest.approx(exact.incoherence_finite_part(mountain, prior))
    written = json.loads(dumps(out))
    assert written["incoherence"] == "inf" and written["return"] == "-inf"


def test_evaluate_a_random_model(ring):
    out = metrics.evaluate(tiny_llama(ring, seed=3), ring, goal="none", temperature=0.5)
    assert set(out) >= {"task", "goal", "success", "return", "incoherence", "incoherence_finite_part",
                        "token_incoherence", "tv_to_retrain", "policy"}
    assert len(out["tv_to_retrain"]) == 5 and out["exact"]
    assert sum(out["token_incoherence"]["by_position"]) == pytest.approx(out["incoherence"], abs=1e-6)
    assert set(out["policy"]) == {k for keys in ring.policy_keys() for k in keys}
    json.dumps(out)


@pytest.fixture(params=["mountain_race", "random-tree:T=3,A=2,seed=0,stochastic=1"])
def pretrained(request, default_prior):
    from lmcoh.lm.loading import load_model
    from lmcoh.tasks.library import load_task

    return load_task(request.param), load_model(default_prior(request.param), device="cpu")


@pytest.mark.slow
def test_pretrained_prior_gives_p_and_goal_conditioned_gives_g(pretrained):
    task, loaded = pretrained
    success = metrics.evaluate(loaded, task, goal="success")
    none = metrics.evaluate(loaded, task, goal="none")
    assert success["tv_to_retrain"][1] <= 0.05
    assert none["tv_to_retrain"][0] <= 0.05
    if task.name == "mountain_race":
        assert success["policy"]["start"]["up"] == pytest.approx(2 / 5, abs=0.03)


def test_reference_model_measures_against_the_models_own_prior(trie_task, llama_tokenizer):
    """Zero-shot: G^k of the model's own unconditioned policy p_M, in the chat format."""
    from conftest import random_standin
    from lmcoh.lm.tabulate import tabulate
    from lmcoh.lm.text import Layout

    lm = random_standin("llama", llama_tokenizer, seed=5)
    layout = Layout("chat", goal_text="Reach the top.")
    out = metrics.evaluate(lm, trie_task, "success", layout=layout, reference="model")
    p_m = tabulate(lm, trie_task, "none", layout=layout).policy
    assert out["reference"] == "model" and out["reference_policy"] == exact.policy_table(trie_task, p_m)
    pi = tabulate(lm, trie_task, "success", layout=layout).policy
    targets = exact.sequence(trie_task, "retrain", metrics.RETRAIN_STEPS, prior=p_m)
    assert out["tv_to_retrain"] == pytest.approx([exact.tv_distance(trie_task, pi, g) for g in targets])
    assert out["format"] == "chat" and out["goal_text"] == "Reach the top."
    task_ref = metrics.evaluate(lm, trie_task, "success", layout=layout)
    assert task_ref["reference"] == "task" and "reference_policy" not in task_ref
    assert task_ref["tv_to_retrain"][0] == pytest.approx(exact.tv_distance(trie_task, pi, exact.prior_policy(trie_task)))
    # the tokens of an action are the ones the model reads after its state's chunk (here after the
    # chat template's "assistant" marker): the per-position terms still add up to the state KL
    tokens = scoring.Codec(lm.tokenizer, trie_task, layout).action_tokens
    rng = np.random.default_rng(1)
    for s in (0, 1):
        acts = list(trie_task.actions_of(s))
        p, q = rng.dirichlet(np.ones(len(acts))), rng.dirichlet(np.ones(len(acts)))
        assert sum(metrics.token_terms([tokens[a] for a in acts], p, q)) == pytest.approx(kl(p, q), abs=1e-12)
    with pytest.raises(ValueError, match="unknown reference"):
        metrics.evaluate(lm, trie_task, reference="prior")
