import json

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2
from lmcoh.oracle import exact
from lmcoh.cli import main
from lmcoh.tasks.generators import generate
from lmcoh.lm.model import load_model, model_layout
from lmcoh.lm.tabulate import tabulate
from lmcoh.lm.pretrain import DEFAULTS, pretrain
from lmcoh.tasks.task import Task


@pytest.mark.parametrize("bad", [{"episodes": 0}, {"none_share": 1.0}, {"model_size": "huge"},
                                 {"learning_rate": 0.0}, {"average_last": 1.0}, {"lora_r": 0},
                                 {"format": "natural"}, {"goal_text": "Win."}])
def test_bad_settings_fail_before_training(bad, mountain, tmp_path):
    with pytest.raises(ValueError):
        pretrain(mountain, tmp_path / "m", **bad)
    assert not (tmp_path / "m").exists()


def quality(task, out):
    """TV of the pretrained model to G(p) under <success> and to p with no goal token."""
    loaded = load_model(str(out), device="cpu")
    layout = model_layout(loaded.meta)
    p = exact.prior_policy(task)
    success = tabulate(loaded, task, "success", layout=layout).policy
    none = tabulate(loaded, task, "none", layout=layout).policy
    return success, exact.tv_distance(task, success, exact.goal_condition(task, p)), \
        exact.tv_distance(task, none, p)


@pytest.mark.slow
def test_mountain_race_prior(mountain, tmp_path):
    out = pretrain(mountain, tmp_path / "prior")
    success, tv_success, tv_none = quality(mountain, out)
    assert success[0][0] == pytest.approx(2 / 5, abs=0.03)  # pi(up | start, <success>)
    assert tv_success <= 0.05 and tv_none <= 0.05
    meta = json.loads((out / "lmcoh.json").read_text())
    assert meta["pretrain"]["episodes"] == DEFAULTS["built-in"]["episodes"] and meta["prompt_mode"] == "history"
    assert meta["format"] == "compact" and meta["goal_text"] is None
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
def test_conditioning_a_foreign_model_trains_lora_and_the_new_rows_only(mountain, tmp_path):
    built = tiny_gpt2(mountain)
    built.model.save_pretrained(tmp_path / "gpt2")
    built.tokenizer.save_pretrained(tmp_path / "gpt2")
    out = pretrain(mountain, tmp_path / "prior", base=str(tmp_path / "gpt2"), episodes=64, epochs=2,
                   batch_size=16)
    loaded = load_model(str(out))
    assert not (out / "adapter_config.json").exists()  # merged: a plain model directory
    assert loaded.model.config.model_type == "gpt2" and len(loaded.tokenizer) == len(built.tokenizer) + 3
    assert loaded.meta["pretrain"]["base"] == str(tmp_path / "gpt2") and loaded.meta["format"] == "compact"
    assert loaded.meta["pretrain"]["added_tokens"] == ["<success>", "<failure>", "<eoa>"]
    before, after = built.model.transformer.wte.weight, loaded.model.transformer.wte.weight
    assert torch.equal(before, after[:len(before)])  # the model's own vocabulary is not retrained
    assert not torch.equal(before[0], after[-1])
    block = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(built.model.state_dict()[block], loaded.model.state_dict()[block])  # LoRA, merged


@pytest.mark.slow
def test_cli_pretrain(tmp_path, capsys):
    out = tmp_path / "prior"
    assert main(["pretrain", "mountain_race", "--out", str(out), "--episodes", "32", "--epochs", "1",
                 "--quiet"]) == 0
    assert load_model(str(out)).meta["task"]["name"] == "mountain_race"


def test_cli_pretrain_bad_input(tmp_path, capsys):
    for args in (["random-tree:T=0"], ["mountain_race", "--base", str(tmp_path / "missing")],
                 ["mountain_race", "--none-share", "1"], ["mountain_race", "--format", "chat"],
                 ["mountain_race", "--goal-text", "Win the race."]):
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
