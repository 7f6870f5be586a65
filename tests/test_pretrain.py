import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_gpt2
from lmcoh.cli import BUDGET_SPENT, main
from lmcoh.tasks.generators import generate
from lmcoh.lm.conditioning import conditioning_tv
from lmcoh.lm.loading import load_model, model_layout
from lmcoh.lm.tabulate import tabulate
from lmcoh.lm.pretrain import DEFAULTS, pretrain
from lmcoh.tasks.task import Task


@pytest.mark.parametrize("bad", [{"episodes": 0}, {"none_share": 1.0}, {"model_size": "huge"},
                                 {"learning_rate": 0.0}, {"average_last": 1.0}, {"lora_r": 0},
                                 {"format": "natural"}, {"goal_text": "Win."}, {"tolerance": 0.0},
                                 {"max_steps": 0}, {"batch_size": 0}, {"embeddings": "some"}])
def test_bad_settings_fail_before_training(bad, mountain, tmp_path):
    with pytest.raises(ValueError):
        pretrain(mountain, tmp_path / "m", **bad)
    assert not (tmp_path / "m").exists()


def quality(task, out):
    """TV of the pretrained model to G(p) under <success> and to p with no goal token."""
    loaded = load_model(str(out), device="cpu")
    layout = model_layout(loaded.meta)
    success = tabulate(loaded, task, "success", layout=layout).policy
    return (success, *conditioning_tv(loaded, task, layout))


@pytest.mark.slow
def test_mountain_race_prior(mountain, default_prior):
    out = Path(default_prior("mountain_race"))  # lmcoh pretrain's defaults, shared with other tests
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
def test_random_tree_prior(stochastic, default_prior):
    spec = f"random-tree:T=3,A=2,seed=0,stochastic={stochastic}"
    _, tv_success, tv_none = quality(generate(spec), default_prior(spec))
    assert tv_success <= 0.05 and tv_none <= 0.05


@pytest.mark.slow
def test_pretraining_is_seeded(mountain, tmp_path):
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = pretrain(mountain, tmp_path / name, episodes=64, epochs=2, batch_size=16, seed=seed)
        weights.append(load_model(str(out)).model.model.embed_tokens.weight)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", ["all", "new"])
def test_conditioning_a_foreign_model_trains_lora_and_the_embeddings(embeddings, mountain, tmp_path):
    built = tiny_gpt2(mountain)
    built.model.save_pretrained(tmp_path / "gpt2")
    built.tokenizer.save_pretrained(tmp_path / "gpt2")
    out = pretrain(mountain, tmp_path / "prior", base=str(tmp_path / "gpt2"), episodes=64, epochs=2,
                   batch_size=16, embeddings=embeddings)
    loaded = load_model(str(out))
    assert not (out / "adapter_config.json").exists()  # merged: a plain model directory
    assert loaded.model.config.model_type == "gpt2" and len(loaded.tokenizer) == len(built.tokenizer) + 3
    assert loaded.meta["pretrain"]["base"] == str(tmp_path / "gpt2") and loaded.meta["format"] == "compact"
    assert loaded.meta["pretrain"]["added_tokens"] == ["<success>", "<failure>", "<eoa>"]
    assert loaded.meta["pretrain"]["embeddings"] == embeddings
    before, after = built.model.transformer.wte.weight, loaded.model.transformer.wte.weight
    up = built.tokenizer(" up", add_special_tokens=False)["input_ids"][0]  # a word of every transcript
    assert torch.equal(before[up], after[up]) == (embeddings == "new")  # the model's own vocabulary
    assert not torch.equal(before[0], after[-1])
    block = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(built.model.state_dict()[block], loaded.model.state_dict()[block])  # LoRA, merged


@pytest.mark.slow
def test_cli_pretrain(tmp_path, capsys):
    out = tmp_path / "prior"
    argv = ["pretrain", "--task", "mountain_race", "--output_dir", str(out), "--pretrain_episodes", "32",
            "--pretrain_epochs", "1", "--disable_tqdm"]
    assert main(argv) == 0
    assert load_model(str(out)).meta["task"]["name"] == "mountain_race"
    weights = (out / "model.safetensors").read_bytes()
    assert main([*argv, "--seed", "1"]) == 2  # nothing is lost: refused, before any work
    assert "already holds config.json, generation_config.json, lmcoh.json and 3 more; pass --overwrite" \
        in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != weights and load_model(str(out)).meta["pretrain"]["seed"] == 1


def test_cli_pretrain_refuses_an_existing_model_before_any_work(mountain, tmp_path, capsys):
    from lmcoh.lm.builtin import build_tokenizer, new_llama
    from lmcoh.lm.loading import save_model

    tok = build_tokenizer(mountain)
    out = save_model(new_llama(tok, hidden_size=32, num_heads=2), tok, tmp_path / "prior", {"kind": "prior"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["pretrain", "mountain_race", "--out", str(out), "--episodes", "100000", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmcoh: error: --output_dir ") and "pass --overwrite to replace it" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the model is unchanged
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("keep me")
    assert main(["pretrain", "mountain_race", "--out", str(tmp_path / "notes"), "--overwrite", "--quiet"]) == 2
    assert "not a model directory; refusing to overwrite it" in capsys.readouterr().err  # --overwrite: models only
    (tmp_path / "F").write_text("a file")
    assert main(["pretrain", "mountain_race", "--out", str(tmp_path / "F" / "sub"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"lmcoh: error: --output_dir {tmp_path / 'F' / 'sub'}: " \
                                              f"{tmp_path / 'F'} is a file, not a directory"


@pytest.mark.slow
@pytest.mark.parametrize("rate, why", [("1e6", "; the model gives every token the same probability)"),
                                       ("1", ")")])
def test_a_finite_blow_up_is_a_divergence_too(rate, why, tmp_path, capsys):
    """1e6 leaves finite weights of ~3e6 and equal logits everywhere; 1 makes the loss rise from 5.6 to
    about 10. Both are refused in one line, and nothing is written."""
    out = tmp_path / "prior"
    assert main(["pretrain", "--task", "mountain_race", "--output_dir", str(out), "--pretrain_episodes", "300",
                 "--pretrain_epochs", "3", "--learning_rate", rate, "--disable_tqdm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmcoh: error: training diverged (the loss on its own examples went from 5.") and \
        err.endswith(f"{why}; the learning rate is the likely cause: lower --learning_rate") and "\n" not in err, err
    assert not out.exists()


def test_cli_pretrain_bad_input(tmp_path, capsys):
    for args in (["random-tree:T=0"], ["mountain_race", "--base", str(tmp_path / "missing")],
                 ["mountain_race", "--format", "chat"], ["mountain_race", "--goal-text", "Win the race."]):
        assert main(["pretrain", *args, "--out", str(tmp_path / "prior"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmcoh: error: ") and "\n" not in err
    for args in (["--episodes", "0"], ["--none-share", "1"]):
        with pytest.raises(SystemExit) as info:
            main(["pretrain", "mountain_race", "--out", str(tmp_path / "prior"), *args])
        assert info.value.code == 2 and capsys.readouterr().err.endswith("(see lmcoh pretrain --help)\n")
    assert not (tmp_path / "prior").exists()


@pytest.mark.slow
def test_cli_pretrain_base_that_cannot_write_the_task(tmp_path, capsys):
    prior = tmp_path / "mr"
    assert main(["pretrain", "mountain_race", "--out", str(prior), "--episodes", "8", "--epochs", "1",
                 "--quiet"]) == 0
    assert main(["pretrain", "random-tree:T=2,A=2", "--base", str(prior), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    assert "cannot write" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---- conditioning pretrained models: the stand-ins of lmcoh.lm.standins (slow) ------------------
@pytest.fixture(scope="module")
def conditioned(standins, tmp_path_factory, trie_task):
    """``conditioned(family, task_name)``: `pretrain --base` on a stand-in with the defaults, once per pair."""
    from lmcoh.tasks.library import load_task

    from conftest import shared_model

    def make(family, name):
        task = trie_task if name == "trie" else load_task(name)
        out = shared_model(tmp_path_factory, f"conditioned-{family}-{name}",
                           lambda path: pretrain(task, path, base=standins[family]))
        return task, Path(out)

    return make


@pytest.mark.slow
@pytest.mark.parametrize("family, name", [("gpt2", "mountain_race"), ("gpt2", "trie"), ("llama", "trie")])
def test_a_conditioned_pretrained_model_gives_g_and_p(family, name, conditioned):
    """Byte-level BPE and SentencePiece models, on the mountain race and on multi-word actions with
    stochastic moves: prompted with <success> within TV 0.05 of G(p), with no goal within 0.05 of p.
    (The Llama stand-in on the mountain race is measured by `python -m lmcoh.bench --base`.)"""
    task, out = conditioned(family, name)
    _, tv_success, tv_none = quality(task, out)
    meta = json.loads((out / "lmcoh.json").read_text())
    check = meta["pretrain"]["check"]
    print(f"{family} {name}: TV to G(p) {tv_success:.4f}, to p {tv_none:.4f}, {meta['pretrain']['steps']} steps, "
          f"{meta['pretrain']['seconds']} s")
    assert tv_success <= 0.05 and tv_none <= 0.05
    assert check["within_tolerance"] and check["steps"] == meta["pretrain"]["steps"] <= DEFAULTS["base"]["max_steps"]
    # the oracle checked the model that was saved (merged into a plain directory, read back)
    assert (check["tv_success_to_g"], check["tv_none_to_p"]) == pytest.approx((tv_success, tv_none), abs=1e-4)
    assert meta["pretrain"]["added_tokens"] == ["<success>", "<failure>", "<eoa>"]


@pytest.mark.slow
def test_self_training_a_conditioned_model_follows_retraining(conditioned, tmp_path):
    """The recipe on the conditioned GPT-2 stand-in, at half the built-in model's learning rate (at
    2e-3 each round overshoots exact G of the model's own policy: pi(up | start) 0.55 for 0.527),
    and half its episodes per round, in batches of 32 to keep the steps."""
    from conftest import ROOT, recipe, recipe_args

    _, out = conditioned("gpt2", "mountain_race")
    run = recipe("self_train").main(*recipe_args(
        "--config", ROOT / "recipes" / "configs" / "mountain_race.yaml", "--model_name_or_path", out,
        "--learning_rate", 1e-3, "--episodes_per_round", 1000, "--global_batch_size", 32,
        "--rounds", 3, "--output_dir", tmp_path / "run", "--disable_tqdm", "true"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["target_success"] for r in rows] == pytest.approx([17 / 20, 0.8676, 0.8856, 0.9031], abs=1e-4)
    for r in rows:
        print(f"round {r['round']}: success {r['success']:.4f}, target {r['target_success']:.4f}")
        assert abs(r["success"] - r["target_success"]) <= 0.03, r


@pytest.mark.slow
def test_cli_pretrain_base_in_the_chat_format_records_it(standins, tmp_path, capsys):
    out = tmp_path / "chat"
    assert main(["pretrain", "mountain_race", "--base", standins["llama"], "--format", "chat", "--goal-text",
                 "Reach the gold.", "--episodes", "8", "--epochs", "1", "--out", str(out),
                 "--quiet"]) == BUDGET_SPENT  # one step: far from G(p), but saved
    capsys.readouterr()
    meta = json.loads((out / "lmcoh.json").read_text())
    assert meta["format"] == "chat" and meta["goal_text"] == "Reach the gold." and meta["pretrain"]["base"]
    assert main(["evaluate", str(out), "--task", "mountain_race", "--json"]) == 0  # the recorded layout
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "chat" and result["goal_text"] == "Reach the gold." and result["reference"] == "task"
    assert main(["pretrain", "mountain_race", "--base", standins["gpt2"], "--format", "chat",
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "has none; use --format compact or natural" in capsys.readouterr().err  # what gpt2 can write


@pytest.mark.slow
def test_a_spent_budget_saves_the_closest_model_and_says_so(standins, tmp_path, capsys):
    out = tmp_path / "prior"
    assert main(["pretrain", "--task", "mountain_race", "--base", standins["gpt2"], "--max_steps", "2",
                 "--output_dir", str(out), "--disable_tqdm"]) == BUDGET_SPENT
    err = capsys.readouterr().err.strip()
    check = json.loads((out / "lmcoh.json").read_text())["pretrain"]["check"]
    assert err.startswith("lmcoh: pretrain: the budget of 2 steps ran out at TV to G(p) ") and "\n" not in err
    assert not check["within_tolerance"] and check["steps"] == 2 and check["checks"][-1][0] == 2
    assert max(check["tv_success_to_g"], check["tv_none_to_p"]) == min(max(c[1:]) for c in check["checks"])
