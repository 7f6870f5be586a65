"""KL-regularised RL through GRPOTrainer (lmcoh.lm.rl, lmcoh.runs.klrl): the completions' scores are
the policy's own, with the gradient of the renormalised policy, and the settings that would make
the update anything but REINFORCE on R - beta KL are refused in one line."""

import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from conftest import ROOT, recipe, tiny_gpt2
from lmcoh.errors import RunError
from lmcoh.lm.adapters import add_lora
from lmcoh.lm.loading import LoadedModel
from lmcoh.lm.rl import Rollouts, episode_reward
from lmcoh.lm.rollout import sample_episodes
from lmcoh.lm.scoring import Codec
from lmcoh.lm.text import Layout
from lmcoh.oracle import exact, klrl
from lmcoh.runs.arguments import parse
from lmcoh.runs.klrl import check_grpo, make_klrl_parser


def _policy(task):
    """A tiny GPT-2 (byte-level BPE, absolute positions: several tokens per action) with a LoRA
    adapter that moves it away from its base."""
    lm = tiny_gpt2(task)
    model = add_lora(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM",
                                          fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return LoadedModel(model, lm.tokenizer)


def _trainer(model):
    return SimpleNamespace(model=model, state=SimpleNamespace(global_step=3),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m, process_index=0, num_processes=1))


def _rows(out, pad):
    """The completions as GRPOTrainer lays them out: the one-token prompt, the completion right-padded."""
    rows = [p + c for p, c in zip(out["prompt_ids"], out["completion_ids"])]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, width - 1


def _whole_text_logpi(model, codec, episode):
    """sum_t log pi(a_t | h_t) from whole texts: each legal action's transcript tokenised whole and
    scored token by token in its own unpadded row, renormalised over the actions."""
    task, total = codec.task, 0.0
    for t, a in enumerate(episode.actions):
        s, states, actions = episode.states[t], episode.states[:t + 1], episode.actions[:t]
        scores = []
        for b in task.actions_of(s):
            ids = torch.tensor([codec.encode(codec.writer.answered("none", states, actions, b))])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            scores.append(logp.gather(-1, ids[0, 1:, None]).sum())
        total = total + torch.log_softmax(torch.stack(scores), 0)[a - task.action_ptr[s]]
    return total


def test_completions_score_as_the_policy_with_its_gradient(mountain):
    lm = _policy(mountain)
    rollouts = Rollouts(mountain, lm.tokenizer, Layout(), "log_q", 0.5, 1e-3, lambda step: step * 7)
    out = rollouts([""] * 12, _trainer(lm.model))
    assert set(out) >= {"prompt_ids", "completion_ids", "logprobs", "env_mask", "klrl_reward"}
    assert all(len(p) == 1 for p in out["prompt_ids"])
    ids, mask, keep = _rows(out, lm.tokenizer.pad_token_id)
    logp, entropy = rollouts.policy_logprobs(lm.model, ids, mask, keep)
    episodes = sample_episodes(lm, mountain, 12, goal="none", seed=3 * 7, progress=False)  # what it sampled
    codec = Codec(lm.tokenizer, mountain, Layout(), "none")
    for i, ep in enumerate(episodes):
        env = torch.tensor(out["env_mask"][i] + [0] * (keep - len(out["env_mask"][i])), dtype=torch.bool)
        assert int(env.sum()) == len(ep.actions)  # each action once, at its first token
        assert float(logp[i][env].sum().detach()) == pytest.approx(sum(ep.logprobs), abs=1e-5)  # the rollout's own pi
        assert float(logp[i][~env].abs().sum().detach()) == 0 and bool((entropy[i][env] > 0).all())
        assert out["task_reward"][i] == pytest.approx(episode_reward(mountain, ep, "log_q", 1e-3))
        assert out["klrl_reward"][i] == pytest.approx(out["task_reward"][i] - 0.5 * out["kl"][i])
    # the gradient is that of the renormalised policy, from unpadded whole-text rows
    lm.model.zero_grad()
    logp.sum().backward()
    ours = [p.grad.clone() for p in lm.model.parameters() if p.requires_grad]
    lm.model.zero_grad()
    sum(_whole_text_logpi(lm.model, codec, ep) for ep in episodes).backward()
    for a, b in zip(ours, (p.grad for p in lm.model.parameters() if p.requires_grad)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # the KL is the rollout's log pi minus the adapter-free model's log p on the same histories
    with lm.model.disable_adapter(), torch.no_grad():
        ref = [float(_whole_text_logpi(lm.model, codec, ep)) for ep in episodes]
    assert out["kl"] == pytest.approx([sum(ep.logprobs) - r for ep, r in zip(episodes, ref)], abs=1e-5)


def test_the_success_reward_is_the_sampled_outcome(mountain):
    lm = _policy(mountain)
    rollouts = Rollouts(mountain, lm.tokenizer, Layout(), "success", 1.0, 1e-3, lambda step: 5)
    out = rollouts([""] * 32, _trainer(lm.model))
    assert set(out["task_reward"]) <= {0.0, 1.0} and 0 < sum(out["task_reward"]) < 32


GOOD = ["--task", "mountain_race", "--output_dir", "/tmp/unused"]


@pytest.mark.parametrize("flags, refused", [
    (["--scale_rewards", "group"], "scale_rewards 'group' is refused: dividing advantages by the rewards' std"),
    (["--loss_type", "grpo"], "loss_type 'grpo' is refused: it weights an episode by one over its length"),
    (["--loss_type", "dapo"], "loss_type 'dapo' is refused"),
    (["--num_iterations", "2"], "num_iterations 2 is refused: more than one update per batch"),
    (["--steps_per_generation", "2"], "steps_per_generation 2 is refused: episodes sampled for one optimiser step"),
    (["--temperature", "0.7"], "temperature 0.7 is refused"),
    (["--top_p", "0.9"], "top_p 0.9 is refused"),
    (["--weight_decay", "0.01"], "weight_decay 0.01 is refused"),
    (["--mask_truncated_completions", "true"], "mask_truncated_completions True is refused"),
    (["--entropy_coef", "0.1"], "entropy_coef 0.1 is refused"),
    (["--disable_dropout", "false"], "disable_dropout False is refused"),
    (["--beta", "-1"], "beta -1.0 is refused"),
])
def test_settings_that_break_reinforce_are_refused_in_one_line(flags, refused):
    _, grpo, _ = parse(make_klrl_parser(), GOOD + flags)
    with pytest.raises(RunError) as err:
        check_grpo(grpo)
    assert str(err.value).startswith(refused) and "\n" not in str(err.value)


def test_the_defaults_are_reinforce_and_sound_settings_are_honoured():
    args, grpo, model = parse(make_klrl_parser(), GOOD + ["--loss_type", "dr_grpo", "--max_grad_norm", "0.5"])
    check_grpo(grpo)
    _, grpo, _ = parse(make_klrl_parser(), GOOD)
    check_grpo(grpo)
    assert (grpo.beta, grpo.scale_rewards, grpo.loss_type, grpo.num_iterations) == (0.5, "none", "luspo", 1)
    assert grpo.num_generations == grpo.generation_batch_size == 64 and grpo.steps_per_generation == 1
    assert args.reward == "log_q" and args.q_floor == 1e-3 and model.use_peft
    with pytest.raises(RunError, match="use_peft is required"):
        recipe("kl_rl").main(*parse(make_klrl_parser(), GOOD + ["--use_peft", "false"]))


# ---- the loop (slow: it samples and trains) ---------------------------------------------------
def _klrl(*argv):
    return recipe("kl_rl").main(*parse(make_klrl_parser(), [str(a) for a in argv]))


@pytest.mark.slow
def test_the_mountain_race_reaches_the_exact_optimum(mountain_prior, tmp_path, mountain):
    """beta = 1/2, R = sum log q: the optimum (temperature 2, G^2(p) from the model's own prior)."""
    out = _klrl("--config", ROOT / "recipes" / "configs" / "kl_rl_mountain_race.yaml", "--model_name_or_path",
                mountain_prior, "--max_steps", 100, "--evaluate_every", 50, "--output_dir", tmp_path / "run",
                "--disable_tqdm", "true")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 50, 100] and rows[-1]["episodes_sampled"] == 100 * 32
    assert rows[0]["tv_to_target"] > 0.1 and rows[-1]["tv_to_target"] < 0.03, [r["tv_to_target"] for r in rows]
    # anyone can recompute the distance from the tables written
    reference = exact.policy_from_table(mountain, json.loads((out / "rounds" / "0" / "eval.json").read_text())
                                        ["reference_policy"])
    target = klrl.optimum(mountain, 0.5, "log_q", reference, 1e-3).policy
    lm = exact.policy_from_table(mountain, rows[-1]["policy"])
    assert exact.tv_distance(mountain, lm, target) == pytest.approx(rows[-1]["tv_to_target"], abs=1e-9)
    assert abs(target[0][0] - 8 / 17) < 0.02 and (out / "report.md").is_file() and (out / "tv.png").is_file()
