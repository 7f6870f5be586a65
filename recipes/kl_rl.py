"""KL-regularised RL: the goal-free LM policy maximises E[R] - beta KL(pi || p) by REINFORCE on whole episodes.

    accelerate launch recipes/kl_rl.py --config recipes/configs/kl_rl_mountain_race.yaml
    torchrun --nproc_per_node 2 recipes/kl_rl.py --config recipes/configs/kl_rl_mountain_race.yaml
    python recipes/kl_rl.py --task stochastic_example --reward success --beta 1 --max_steps 200

docs/theory.md, "A fourth pressure: KL-regularised RL". The policy pi is the model prompted with no
goal (the built-in prior, or the given model, with a fresh LoRA adapter); the reference p is the same
model with the adapter disabled; R is sum_t log max(q, epsilon) (--reward log_q, epsilon = --q_floor) or the episode's
sampled outcome (--reward success). Every --evaluate_every the policy is tabulated exactly and compared
with the exact optimum of J_beta (lmcoh exact's klrl and klrl_success sequences at beta = 1/k).

TRL's GRPOTrainer computes an unbiased REINFORCE gradient of J_beta under these settings (lmcoh's
defaults; lmcoh.runs.klrl.check_grpo refuses the others with one line):

* The KL goes into the reward, as the k1 estimate sum_t log pi(a_t|h_t)/p(a_t|h_t) of each episode,
  at the run's ``beta``; TRL's own ``beta`` (a per-token k3 estimate in the loss, importance-weighted
  by default) is set to 0 by the run. REINFORCE on R - beta k1 is unbiased: E[grad log pi] = 0 makes
  the k1 term's extra gradient vanish, while the k3 estimator in the loss has another fixed point.
* ``scale_rewards: none``: the advantage is the reward minus its group mean (a baseline, which keeps
  the gradient unbiased up to the factor 1 - 1/G); dividing by the group's std would rescale each
  group's gradient by a random amount correlated with its rewards. ``num_generations`` defaults to
  the whole batch, so the baseline is the batch mean (``multi_objective_aggregation`` must stay
  sum_then_normalize, since the other divides by the std).
* On-policy: ``num_iterations: 1`` and ``steps_per_generation`` equal to
  ``gradient_accumulation_steps`` (leave it and ``generation_batch_size`` unset), so every batch of
  episodes makes one optimiser step from the policy that sampled it; the importance ratios are 1
  and PPO's clipping (``epsilon``) never acts.
* ``loss_type: luspo``: the loss sums over an episode's actions and averages over episodes, so no
  episode is reweighted by its length (GRPO's per-sequence token mean divides by the length; bnpo
  and dapo divide by the batch's token count, a random number). ``dr_grpo`` (a constant rescaling)
  is accepted too. Both ``importance_sampling_level`` values give the same update on policy.
* The environment's tokens are masked with ``env_mask``, and each action counts once, at its first
  token, as log pi(a_t | h_t) renormalised over the legal actions (lmcoh.lm.rl.KLRLTrainer), the
  policy that rollouts sample and tabulation measures.
* Sampling settings (``temperature`` 1, no ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
  no vLLM): lmcoh's rollouts sample the policy itself. No ``mask_truncated_completions`` (episodes
  end with the environment's text), no entropy bonus or entropy mask, no off-policy mask,
  ``weight_decay: 0`` (decay pulls the adapter towards p beyond the KL), ``disable_dropout``.
  ``max_grad_norm`` (clipping) and the learning-rate schedule are honoured: they change the step,
  not the direction's expectation at the fixed point.
"""

from pathlib import Path

from lmcoh.runs.arguments import KLRLArguments, run_recipe
from lmcoh.runs.klrl import KLRL, make_klrl_parser


def main(script_args: KLRLArguments, grpo_args, model_args) -> Path:
    """Run (or resume) KL-regularised RL into ``grpo_args.output_dir`` and return it."""
    run = KLRL(script_args, grpo_args, model_args)  # every input checked before any work
    with run.opened() as done:                      # locked; `done` evaluations are complete already
        run.pretrain_prior()                        # p: lmcoh's built-in prior, when no model is given
        policy = run.policy()                       # pi_0 = p: the base model with a fresh adapter
        if done == 0:
            run.evaluate(policy, step=0)            # evaluation 0: p itself, and the exact optimum from it
        trainer = run.trainer(policy)               # GRPOTrainer: episodes, R - beta KL, REINFORCE
        run.train(trainer, done)                    # resumes from the last evaluation's checkpoint
        run.finish()                                # report.md and its plots
    return run.path


if __name__ == "__main__":
    run_recipe("kl_rl", main, make_klrl_parser(__doc__))
