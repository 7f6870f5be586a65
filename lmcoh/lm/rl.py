"""KL-regularised RL through TRL's `GRPOTrainer`: whole episodes as completions, the KL in the reward.

docs/theory.md, "A fourth pressure: KL-regularised RL": maximise J_beta(pi) = E_pi[R] - beta KL(pi || p).
REINFORCE on the shaped reward R - beta sum_t log(pi(a_t | h_t) / p(a_t | h_t)), on-policy and
without scaling the rewards, is an unbiased gradient of J_beta. `KLRLTrainer` makes GRPOTrainer
compute exactly that:

* `Rollouts` is GRPOTrainer's ``rollout_func``. It plays whole episodes with lmcoh's batched
  rollouts (lmcoh.lm.rollout), so the policy trained is the one `lmcoh.lm.tabulate` measures: the
  model prompted with no goal, each action's probability renormalised over the legal actions.
  The reference p is the same model with its adapter disabled, scored on the same histories.
  Each episode becomes one completion: its whole transcript after the first token (one-token
  prompts need no left padding, so positions are the rollout's for any position embedding).
* The reward of an episode is R - beta * KL, with R = sum_t log max(q, epsilon) (``log_q``) or
  the sampled outcome, 1 or 0 (``success``), and KL = sum_t log pi/p from the rollout's own
  probabilities: the k1 estimate, in the reward.
* `KLRLTrainer` scores a completion as the policy it is: TRL would score its tokens under the raw
  model, whose gradient differs from the policy's by the gradient of log Z(h), the log of the mass
  the model puts on the legal actions after history h (and a tokenizer that merges an action's
  last token into the next state's text would leave a token out). So each action counts once,
  at its first token (``env_mask`` is 1 there and 0 on every other token), with the value
  log pi(a_t | h_t) recomputed with gradients from every legal action's tokens after h_t; the
  entropy TRL logs is then that of pi(. | h_t), per decision.

The GRPOConfig settings that make the rest of GRPOTrainer plain REINFORCE are in
`lmcoh.runs.klrl` (which also refuses the settings that would not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from trl import GRPOTrainer

from ..oracle import klrl
from ..tasks.task import Task
from .rollout import rollout
from .scoring import Codec, score_contexts
from .text import Layout

REWARDS = tuple(klrl.REWARDS.values())  # R = sum log max(q, epsilon), or the outcome


@dataclass
class Decision:
    """One decision of a completion: the index in the completion of its action's first token, the
    row's tokens before the action (after any take-back), every legal action's tokens, and which
    one the episode took."""

    column: int
    prefix: list[int]
    choices: list[tuple[int, ...]]
    chosen: int


def episode_reward(task: Task, episode, reward: str, epsilon: float) -> float:
    """R of one sampled episode: sum log max(q, epsilon) along it, or its outcome (1 or 0)."""
    if reward == "success":
        return float(episode.success)
    floor = math.log(epsilon)
    end = episode.states[-1]
    last = task.terminal_logq[end] if task.terminal[end] else task.timeout_logq
    return float(np.sum(np.maximum(task.action_logq[episode.actions], floor)) + max(last, floor))


class Rollouts:
    """GRPOTrainer's ``rollout_func``: episodes of the goal-free policy with their shaped rewards.

    ``seed_of(step)`` seeds the episodes of optimiser step ``step`` (each process drawing its rows of
    one table), so a resumed run samples what an uninterrupted one does, on any number of processes. `decisions` remembers each completion's
    decisions by its tokens, for `KLRLTrainer` to renormalise."""

    def __init__(self, task: Task, tokenizer, layout: Layout, reward: str, beta: float, epsilon: float,
                 seed_of, batch_size: int = 256):
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
        self.task, self.tokenizer, self.reward, self.beta, self.epsilon = task, tokenizer, reward, beta, epsilon
        self.codec = Codec(tokenizer, task, layout, "none")
        self.seed_of, self.batch_size = seed_of, batch_size
        self.decisions: dict[tuple[int, ...], list[Decision]] = {}

    def __call__(self, prompts: list, trainer) -> dict:
        from .loading import LoadedModel

        model, acc, n = trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator, len(prompts)
        rank = acc.process_index  # each process takes its rows of one seeded table: together, one process's draw
        episodes = [ep for ep, _ in rollout(LoadedModel(model, self.tokenizer), self.task, n * acc.num_processes,
                                            goal="none", seed=self.seed_of(trainer.state.global_step),
                                            batch_size=self.batch_size, progress=False, codec=self.codec,
                                            rows=range(rank * n, (rank + 1) * n))]
        with model.disable_adapter():
            reference = self._reference_logprobs(model, episodes)
        self.decisions.clear()
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [], "klrl_reward": [],
               "task_reward": [], "kl": []}
        for episode, ref in zip(episodes, reference):
            ids, mask, decisions, token_logps = self._completion(episode)
            self.decisions[tuple(ids)] = decisions
            kl = float(np.sum(np.asarray(episode.logprobs) - ref))
            r = episode_reward(self.task, episode, self.reward, self.epsilon)
            out["prompt_ids"].append(ids[:1])
            out["completion_ids"].append(ids[1:])
            out["env_mask"].append(mask[1:])
            out["logprobs"].append(token_logps[1:])
            out["task_reward"].append(r)
            out["kl"].append(kl)
            out["klrl_reward"].append(r - self.beta * kl)
        return out

    def _reference_logprobs(self, model, episodes) -> list[np.ndarray]:
        """log p(a_t | h_t) of every decision of every episode under ``model`` (the reference),
        each distinct history scored once."""
        codec, index, histories = self.codec, {}, []
        for ep in episodes:
            for t in range(len(ep.actions)):
                key = (tuple(ep.states[:t + 1]), tuple(ep.actions[:t]))
                if key not in index:
                    index[key] = len(histories)
                    histories.append(key)
        choices = [codec.choices(states[-1], len(states) - 1) for states, _ in histories]
        logp = score_contexts(model, [codec.prompt(list(s), list(a)) for s, a in histories],
                              [c for _, c in choices], [b for b, _ in choices], batch_size=self.batch_size)
        return [np.array([logp[index[(tuple(ep.states[:t + 1]), tuple(ep.actions[:t]))]]
                          [a - int(self.task.action_ptr[ep.states[t]])] for t, a in enumerate(ep.actions)])
                for ep in episodes]

    def _completion(self, episode) -> tuple[list[int], list[int], list[Decision], list[float]]:
        """The episode's tokens as the model reads them (`Codec.episode`), the mask of its actions'
        first tokens, its decisions, and per-token log-probabilities (log pi of each action on
        its first token)."""
        ids, actions = self.codec.episode(episode.states, episode.actions)
        if self.tokenizer.eos_token_id is not None:  # the episode is over: TRL counts it as terminated
            ids, actions = ids + [self.tokenizer.eos_token_id], actions + [0]
        first = [j for j in range(len(ids)) if actions[j] and not (j and actions[j - 1])]
        mask, logps, decisions = [0] * len(ids), [0.0] * len(ids), []
        for t, j in enumerate(first):
            s = episode.states[t]
            choices = self.codec.choices(s, t)[1]
            decisions.append(Decision(j - 1, ids[:j], list(choices), episode.actions[t] - int(self.task.action_ptr[s])))
            mask[j], logps[j] = 1, float(episode.logprobs[t])
        return ids, mask, decisions, logps

    def policy_logprobs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(a_t | h_t) and the entropy of pi(. | h_t) at the first token of each action of each
        row (0 elsewhere), the rows laid out as GRPOTrainer lays out completions (a one-token prompt,
        then the completion, right-padded), with gradients."""
        index: dict[tuple[int, ...], int] = {}  # each distinct (history, action) row is run once
        rows, tails, slots = [], [], []
        for r in range(len(input_ids)):
            for d in self.decisions[tuple(input_ids[r][attention_mask[r].bool()].tolist())]:
                which = []
                for c in d.choices:
                    row = (*d.prefix, *c)
                    if row not in index:
                        index[row] = len(rows)
                        rows.append(list(row))
                        tails.append(len(c))
                    which.append(index[row])
                slots.append((r, d.column, which, d.chosen))
        logp = torch.zeros(len(input_ids), logits_to_keep, device=input_ids.device)
        entropy = torch.zeros_like(logp)
        if not rows:
            return logp, entropy
        scores = _tail_logprobs(model, rows, tails)  # one forward: a data-parallel wrapper expects one
        for r, column, which, chosen in slots:
            pi = torch.log_softmax(scores[which], dim=0)
            logp[r, column] = pi[chosen]
            entropy[r, column] = -(pi.exp() * pi).sum().detach()
        return logp, entropy


def _tail_logprobs(model, rows: list[list[int]], tails: list[int]) -> torch.Tensor:
    """log p(the last ``tails[i]`` tokens of rows[i] | the tokens before them), with gradients. Rows
    are left-padded with explicit positions, so each row sees the positions it has alone."""
    device = next(model.parameters()).device
    width, keep = max(len(r) for r in rows), max(tails) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, device=device)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # column j predicts token width - keep + 1 + j
    picked = logp.gather(-1, ids[:, width - keep + 1:, None]).squeeze(-1)
    in_tail = torch.arange(keep - 1, device=device)[None, :] >= keep - 1 - torch.tensor(tails, device=device)[:, None]
    return (picked * in_tail).sum(1)


def klrl_reward(completions, klrl_reward, task_reward, kl, log_metric=None, **_) -> list[float]:
    """GRPOTrainer's reward function: the shaped reward `Rollouts` computed (R and KL are logged)."""
    if log_metric is not None:
        log_metric("task_reward", float(np.mean(task_reward)))
        log_metric("kl_to_reference", float(np.mean(kl)))
    return klrl_reward


class KLRLTrainer(GRPOTrainer):
    """GRPOTrainer on whole episodes from `Rollouts`, each scored as the policy scores it."""

    def __init__(self, model, args, rollouts: Rollouts, train_dataset, callbacks=None):
        super().__init__(model=model, reward_funcs=[klrl_reward], args=args, train_dataset=train_dataset,
                         processing_class=rollouts.tokenizer, callbacks=callbacks, rollout_func=rollouts)
        self.rollouts = rollouts

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **_):
        """log pi(a_t | h_t) at each action's first token (`Rollouts.policy_logprobs`), instead of
        the raw model's log-probability of every token."""
        logp, entropy = self.rollouts.policy_logprobs(model, input_ids, attention_mask, logits_to_keep)
        return logp, entropy if compute_entropy else None, None
