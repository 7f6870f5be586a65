import json

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2
from lmcoh.oracle import exact
from lmcoh.cli import main
from lmcoh.tasks.episodes import sample_prior_episodes
from lmcoh.tasks.generators import generate
from lmcoh.lm.model import load_model
from lmcoh.lm.tabulate import tabulate
from lmcoh.lm.pretrain import PretrainConfig, pretrain, training_texts
from lmcoh.tasks.task import Task


def test_training_texts_put_the_outcome_in_the_prompt(mountain):
    labelled = sample_prior_episodes(mountain, 6, np.random.default_rng(0))
    bare = sample_prior_episodes(mountain, 3, np.random.default_rng(1))
    prompts, completions = training_texts(mountain, labelled, bare)
    assert prompts == ["<success>" if e.success else "<failure>" for e in labelled] + [""] * 3
    assert all(c.startswith(" [start] ") and c.endswith(" <eoa>") for c in completions)


@pytest.mark.parametrize("bad", [{"episodes": 0}, {"none_share": 1.0}, {"model_size": "huge"},
                                 {"learning_rate": 0.0}, {"average_last": 1.0}])
def test_bad_settings_fail_before_training(bad, mountain, tmp_path):
    with pytest.raises(ValueError):
        pretrain(mountain, tmp_path / "m", **bad)
    assert not (tmp_path / "m").exists()


def quality(task, out):
    """TV of the pretrained model to G(p) under <success> and to p with no goal token."""
    loaded = load_model(str(out), device="cpu")
    p = exact.prior_policy(task)
    success = tabulate(loaded, task, "success").policy
    none = tabulate(loaded, task, "none").policy
    return success, exact.tv_distance(task, success, exact.goal_condition(task, p)), \
        exact.tv_distance(task, none, p)


@pytest.mark.slow
def test_mountain_race_prior(mountain, tmp_path):
    out = pretrain(mountain, tmp_path / "prior")
    success, tv_success, tv_none = quality(mountain, out)
    assert success[0][0] == pytest.approx(2 / 5, abs=0.03)  # pi(up | start, <success>)
    assert tv_success <= 0.05 and tv_none <= 0.05
    meta = json.loads((out / "lmcoh.json").read_text())
    assert meta["pretrain"]["episodes"] == PretrainConfig.episodes and meta["prompt_mode"] == "history"
    rebuilt = Task.from_spec(meta["task"]["spec"])
    assert rebuilt.state_names == mountain.state_names and np.allclose(rebuilt.prior, mountain.prior)


@pytest.mark.slow
@pytest.mark.parametrize("stochastic", [0, 1])
def test_random_tree_prior(stochastic, tmp_path):
    task = generate(f"random-tree:T=3,A=2,seed=0,stochastic={stochastic}")
    _, tv_success, tv_none = quality(task, pretrain(task, tmp_path / "prior"))
    assert tv_success <= 0.05 and tv_none <= 0.05


@pytest.mark.slow
def test_pretraining_is_seeded(mountain, tmp_path):
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = pretrain(mountain, tmp_path / name, episodes=64, epochs=2, batch_size=16, seed=seed)
        weights.append(load_model(str(out)).model.model.embed_tokens.weight)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


@pytest.mark.slow
def test_continue_pretraining_a_foreign_model(mountain, tmp_path):
    built = tiny_gpt2(mountain)
    built.model.save_pretrained(tmp_path / "gpt2")
    built.tokenizer.save_pretrained(tmp_path / "gpt2")
    out = pretrain(mountain, tmp_path / "prior", base=str(tmp_path / "gpt2"), episodes=64, epochs=2,
                   batch_size=16)
    loaded = load_model(str(out))
    assert loaded.model.config.model_type == "gpt2" and len(loaded.tokenizer) == len(built.tokenizer)
    assert loaded.meta["pretrain"]["base"] == str(tmp_path / "gpt2")
    before = built.model.transformer.wte.weight
    assert not torch.equal(before, loaded.model.transformer.wte.weight)


@pytest.mark.slow
def test_cli_pretrain(tmp_path, capsys):
    out = tmp_path / "prior"
    assert main(["pretrain", "mountain_race", "--out", str(out), "--episodes", "32", "--epochs", "1",
                 "--quiet"]) == 0
    assert load_model(str(out)).meta["task"]["name"] == "mountain_race"


def test_cli_pretrain_bad_input(tmp_path, capsys):
    for args in (["random-tree:T=0"], ["mountain_race", "--base", str(tmp_path / "missing")],
                 ["mountain_race", "--none-share", "1"]):
        assert main(["pretrain", *args, "--out", str(tmp_path / "prior"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmcoh: error: ") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["pretrain", "mountain_race", "--out", str(tmp_path / "prior"), "--episodes", "0"])
    assert not (tmp_path / "prior").exists()


@pytest.mark.slow
def test_cli_pretrain_base_that_cannot_write_the_task(tmp_path, capsys):
    prior = tmp_path / "mr"
    assert main(["pretrain", "mountain_race", "--out", str(prior), "--episodes", "8", "--epochs", "1",
                 "--quiet"]) == 0
    assert main(["pretrain", "random-tree:T=2,A=2", "--base", str(prior), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "cannot write" in capsys.readouterr().err and not (tmp_path / "x").exists()
