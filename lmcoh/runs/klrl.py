"""A KL-regularised RL run as one object; the loop itself is recipes/kl_rl.py.

docs/theory.md, "A fourth pressure: KL-regularised RL": the policy pi (the model prompted with no
goal, with a LoRA adapter) maximises J_beta(pi) = E[R] - beta KL(pi || p), the reference p being the
same model with the adapter disabled, by REINFORCE through TRL's GRPOTrainer (lmcoh.lm.rl; the
settings that make GRPO plain REINFORCE are checked by `check_grpo`). Every ``evaluate_every``
optimiser steps the policy is tabulated exactly and compared with the exact optimum of J_beta
(lmcoh.oracle.klrl) from the reference's own tabulated policy (``reference="model"``) or the task's
prior (``"task"``).

The run directory is self-training's (lmcoh.runs.directory) with an evaluation where
self-training has a round: ``rounds/k`` is evaluation k, after step k x evaluate_every (the last at
max_steps), with metrics.json (its metrics.jsonl line), eval.json (the `lmcoh evaluate` object of
the policy), and for k > 0 model/ (the adapter) and checkpoint/ (the Trainer's: adapter, optimiser,
scheduler, RNG states, trainer state). A rerun resumes from the last complete evaluation's
checkpoint; the episodes of step s are seeded from (seed, s), so it computes the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from .. import faults, io
from ..errors import DivergenceError, LmcohError, RunError
from ..oracle import exact, klrl
from .arguments import KLRLArguments
from .run import Run
from .selftrain import round_seed

# What the run sets in the trainer's config, whatever the user's says (shown by --help).
KLRL_OVERRIDES = {
    "output_dir": "OUTPUT_DIR/trainer (the Trainer's scratch; checkpoints move to OUTPUT_DIR/rounds/K/checkpoint)",
    "beta": "0 on the loss side (TRL's k3 KL); the run's beta is the k1 KL in the reward",
    "save_strategy, save_steps": "every evaluate_every steps and at max_steps, with an exact evaluation",
}


# GRPO's own generation settings. GRPOTrainer never generates here: lmcoh's rollouts sample every
# episode (rollout_func), so any value but TRL's default would be accepted and then ignored.
GENERATION_ONLY = ("generation_kwargs", "chat_template_kwargs", "cache_implementation", "num_generations_eval",
                   "ds3_gather_for_generation", "max_tool_calling_iterations", "use_transformers_paged",
                   "use_transformers_continuous_batching", "transformers_continuous_batching_config")


def _generation_setting(grpo) -> str | None:
    """The first generation-only setting (`GENERATION_ONLY`, every ``vllm_*``) not at TRL's default."""
    from trl import GRPOConfig

    for f in dataclasses.fields(GRPOConfig):
        if (f.name in GENERATION_ONLY or f.name.startswith("vllm_")) and f.default is not dataclasses.MISSING \
                and getattr(grpo, f.name) != f.default:
            return f.name
    return None


def check_grpo(grpo) -> None:
    """`RunError` (one line) for a `GRPOConfig` setting under which GRPOTrainer's update is not an
    unbiased REINFORCE gradient of J_beta (recipes/kl_rl.py's docstring says why each matters)."""
    off = {
        "scale_rewards": (grpo.scale_rewards != "none", "dividing advantages by the rewards' std moves the "
                                                        "fixed point away from the optimum; use none"),
        "loss_type": (grpo.loss_type not in ("luspo", "dr_grpo"), "it weights an episode by one over its length "
                      "or by the batch's token count; use luspo (or dr_grpo)"),
        "num_iterations": (grpo.num_iterations != 1, "more than one update per batch of episodes is off-policy "
                                                     "(clipped importance ratios); use 1"),
        "steps_per_generation": (grpo.steps_per_generation != grpo.gradient_accumulation_steps,
                                 "episodes sampled for one optimiser step and used for another are off-policy; "
                                 "leave generation_batch_size and steps_per_generation unset"),
        "multi_objective_aggregation": (grpo.multi_objective_aggregation != "sum_then_normalize",
                                        "normalize_then_sum divides by the rewards' std"),
        "temperature": (grpo.temperature != 1.0, "episodes are sampled from the policy itself; use 1"),
        "top_p": (grpo.top_p != 1.0, "episodes are sampled from the whole renormalised policy"),
        "top_k": (bool(grpo.top_k), "episodes are sampled from the whole renormalised policy"),
        "min_p": (grpo.min_p is not None, "episodes are sampled from the whole renormalised policy"),
        "repetition_penalty": (grpo.repetition_penalty != 1.0, "episodes are sampled from the policy itself"),
        "use_vllm": (grpo.use_vllm, "episodes are sampled by lmcoh's rollouts, which tabulation measures"),
        "mask_truncated_completions": (grpo.mask_truncated_completions, "episodes end with the environment's "
                                                                        "text, not an end token"),
        "top_entropy_quantile": (grpo.top_entropy_quantile != 1.0, "it drops actions from the loss"),
        "entropy_coef": (grpo.entropy_coef != 0.0 or grpo.use_adaptive_entropy, "an entropy bonus changes the "
                                                                                 "objective"),
        "off_policy_mask_threshold": (grpo.off_policy_mask_threshold is not None, "it drops episodes from the loss"),
        "delta": (grpo.delta is not None and grpo.delta < 1.0, "it clips the ratio 1 of an on-policy update"),
        "weight_decay": (grpo.weight_decay != 0.0, "decaying the adapter pulls the policy towards p beyond the KL"),
        "sync_ref_model": (grpo.sync_ref_model, "the reference p must stay the model the run starts from"),
        "disable_dropout": (not grpo.disable_dropout, "episodes are sampled without dropout"),
        "reward_weights": (grpo.reward_weights not in (None, [1.0]), "the run has one reward"),
        "beta": (not grpo.beta >= 0 or math.isinf(grpo.beta), "the KL coefficient must be a number >= 0"),
        "max_steps": (grpo.max_steps < 1, "a run takes max_steps optimiser steps; set it >= 1"),
    }
    for name, (bad, why) in off.items():
        if bad:
            raise RunError(f"{name} {getattr(grpo, name, '')!r} is refused: {why}")
    if grpo.log_completions_hub_repo is not None:
        raise RunError("log_completions_hub_repo is refused: lmcoh never contacts a model hub")
    name = _generation_setting(grpo)
    if name is not None:
        raise RunError(f"{name} {getattr(grpo, name)!r} is refused: GRPO's own generation never runs, lmcoh's "
                       "rollouts sample every episode")


def make_klrl_parser(description: str = ""):
    """The recipe's `TrlParser` over (`KLRLArguments`, `PolicyGRPOConfig`, `PolicyModelConfig`)."""
    from ..lm.configs import PolicyGRPOConfig
    from .arguments import make_parser

    return make_parser(KLRLArguments, "kl_rl", description, output_dir="outputs/kl_rl",
                       trainer_type=PolicyGRPOConfig, overrides=KLRL_OVERRIDES)


def config_header() -> str:
    lines = ["Every resolved setting of this run (--config reads it back). The run sets these trainer",
             "settings itself:"] + [f"  {name}: {how}" for name, how in KLRL_OVERRIDES.items()]
    return "".join(f"# {line}\n" for line in lines)


class KLRL(Run):
    """One KL-regularised RL run into ``grpo.output_dir``, built from the recipe's (`KLRLArguments`,
    `PolicyGRPOConfig`, `PolicyModelConfig`); every input is checked before any work."""

    def __init__(self, args: KLRLArguments, grpo, model_args, state=None):
        check_grpo(grpo)
        if not model_args.use_peft:
            raise RunError("use_peft is required: the reference p is the model with its adapter disabled")
        super().__init__(args, grpo, model_args, state)
        self.grpo, self.beta = grpo, grpo.beta
        self.kind = next(kind for kind, reward in klrl.REWARDS.items() if reward == args.reward)
        self.episodes_per_step = grpo.generation_batch_size
        self._target: tuple[exact.Policy, exact.Policy] | None = None
        self._clock = {"start": time.perf_counter(), "before": 0.0}

    def header(self) -> str:
        return config_header()

    # ---- the policy, its reference and the target ---------------------------------------------------
    def policy(self):
        """The policy the run trains: the base model with a fresh adapter from `trl.get_peft_config`
        (a resumed run's adapter comes from its checkpoint)."""
        from trl import get_peft_config

        from ..lm.adapters import add_lora
        from ..lm.loading import load_model

        loaded = load_model(self.base, **self.init_kwargs)
        with _seeded(self.seed):  # peft draws the adapter's initial weights from torch's generator
            loaded.model = add_lora(loaded.model, get_peft_config(self.model_args))
        return loaded

    def target(self, policy) -> tuple[exact.Policy, exact.Policy]:
        """(the reference p, the exact optimum of J_beta from it): p is the adapter-free model with no
        goal, tabulated (``reference="model"``), or the task's prior."""
        if self._target is None:
            if self.args.reference == "task":
                p = exact.prior_policy(self.task)
            else:
                with policy.model.disable_adapter():
                    p = self._tabulate(policy).policy
            self._target = p, klrl.optimum(self.task, self.beta, self.args.reward, p, self.args.q_floor).policy
        return self._target

    def _tabulate(self, policy, step: int = 0):
        from ..lm.tabulate import tabulate

        a = self.args
        return tabulate(policy, self.task, "none", layout=self.layout, max_histories=a.max_histories,
                        batch_size=a.sample_batch_size, mc_episodes=a.eval_episodes,
                        seed=round_seed(self.seed, step, 1 << 16))

    # ---- training ---------------------------------------------------------------------------------
    def trainer(self, policy):
        """GRPOTrainer on whole episodes of ``policy`` (lmcoh.lm.rl.KLRLTrainer), with `KLRL_OVERRIDES`
        applied, checking its weights every step and evaluating every ``evaluate_every``."""
        import datasets

        from ..lm.rl import KLRLTrainer, Rollouts
        from ..lm.training import Divergence, route_logs

        a = self.args
        args = dataclasses.replace(self.grpo, output_dir=str(self.run.path / "trainer"), beta=0.0,
                                   save_strategy="steps", save_steps=a.evaluate_every, save_total_limit=None,
                                   save_only_model=False, generation_batch_size=None, steps_per_generation=None)
        rollouts = Rollouts(self.task, policy.tokenizer, self.layout, a.reward, self.beta, a.q_floor,
                            lambda step: round_seed(self.seed, step + 1), a.sample_batch_size)
        prompts = datasets.Dataset.from_dict({"prompt": [""] * self.episodes_per_step})
        watch = Divergence(policy.model)
        trainer = KLRLTrainer(policy.model, args, rollouts, prompts, callbacks=[watch, _Evaluations(self, policy)])
        trainer.divergence = watch
        (self.run.path / "logs").mkdir(exist_ok=True)
        route_logs(trainer, self.run.path / "logs" / "train.jsonl")
        return trainer

    def train(self, trainer, done: int) -> None:
        """Train to max_steps, from the last complete evaluation's checkpoint when ``done`` > 1; a
        diverged or failed step is one line, and the evaluations written so far stay resumable."""
        checkpoint = self.run.round_dir(done - 1) / "checkpoint" if done > 1 else None
        if checkpoint is not None:
            last = io.read_json(self.run.round_dir(done - 1) / "metrics.json")
            if last["step"] >= self.grpo.max_steps:
                return  # trained to the end before: the Trainer would take one more step
            self._clock["before"] = float(last["train_seconds"])
        self._clock["start"] = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            trainer.divergence.check(result.training_loss, trainer.args)
        except DivergenceError as err:
            raise RunError(f"{err}; the learning rate ({self.grpo.learning_rate:g}) is the likely cause: lower "
                           "--learning_rate or --max_grad_norm") from None
        except LmcohError as err:
            raise RunError(f"step {trainer.state.global_step + 1}: {err}") from None
        self.state.wait_for_everyone()

    # ---- evaluations ------------------------------------------------------------------------------
    def evaluate(self, policy, step: int, checkpoint: Path | None = None) -> dict | None:
        """Tabulate the policy after ``step`` steps, compare it with the exact optimum of J_beta and
        write the evaluation (main process), moving the Trainer's ``checkpoint`` into it. Returns
        the metrics.jsonl line."""
        if not self.state.is_main_process:
            return None
        from ..lm.loading import save_model
        from ..lm.metrics import report

        a, t0 = self.args, time.perf_counter()
        train_seconds = self._clock["before"] + (t0 - self._clock["start"] if step else 0.0)
        reference, target = self.target(policy)
        lm = self._tabulate(policy, step)
        detail = report(self.task, lm, "none", a.kappa_delta, reference)
        k = -(-step // a.evaluate_every)  # evaluation k is after step k x evaluate_every (or max_steps)
        line = {"round": k, "step": step, "beta": self.beta, "reward": a.reward, "epsilon": a.q_floor,
                "reference": a.reference, "success": detail["success"]}
        if lm.exact:
            line.update({"target_success": exact.success(self.task, target),
                         "tv_to_target": exact.tv_distance(self.task, lm.policy, target),
                         "incoherence": detail["incoherence"],
                         "incoherence_finite_part": detail["incoherence_finite_part"],
                         "target_incoherence": exact.incoherence(self.task, target, a.kappa_delta)})
        else:
            line.update({"success_ci": detail["success_ci"], "target_success": None, "tv_to_target": None})
        line.update({"episodes_sampled": step * self.episodes_per_step, "gradient_steps": step,
                     "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0,
                     "policy": detail["policy"]})
        line = io.jsonable(line)
        tmp = self.run.begin_round(k)
        if step:
            save_model(policy.model, policy.tokenizer, tmp / "model",
                       {**policy.meta, "klrl": {"step": step, "beta": self.beta, "reward": a.reward,
                                                "task": self.task.name}})
            shutil.move(str(checkpoint), tmp / "checkpoint")
        faults.point("write_round")
        io.write_json(tmp / "eval.json", detail)
        io.write_json(tmp / "metrics.json", line)
        self.run.commit_round(k, tmp)
        print(summary(line, self.grpo.max_steps), flush=True)
        return line

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self) -> Path | None:
        """Remove the Trainer's scratch; write report.md with its plots (main process)."""
        if not self.state.is_main_process:
            return None
        from ..report.klrl import write_klrl_report

        shutil.rmtree(self.run.path / "trainer", ignore_errors=True)
        faults.point("report")
        start = io.read_json(self.run.round_dir(0) / "eval.json")  # the reference p, as evaluation 0 tabulated it
        target = klrl.optimum(self.task, self.beta, self.args.reward,
                              exact.policy_from_table(self.task, start["reference_policy"]), self.args.q_floor).policy
        out = write_klrl_report(self.run.path, self.run.complete_rounds(), self.task, self.config, target)
        print(f"report: {out}", flush=True)
        return out


class _Evaluations(TrainerCallback):
    """Saves a checkpoint at max_steps too, and evaluates the policy at every checkpoint."""

    def __init__(self, run: KLRL, policy):
        self.run, self.policy = run, policy

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        self.run.state.wait_for_everyone()  # every process has written its RNG state
        self.run.evaluate(self.policy, state.global_step,
                          Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.run.state.wait_for_everyone()


@contextmanager
def _seeded(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def summary(line: dict, steps: int) -> str:
    """One line per evaluation for the terminal."""
    def f(x):
        return x if isinstance(x, str) or x is None else f"{x:.4f}"

    return (f"step {line['step']}/{steps}: success {f(line['success'])} (target {f(line['target_success'])}), "
            f"tv_to_target {f(line['tv_to_target'])}, {line['episodes_sampled']} episodes, "
            f"{line['train_seconds']:.1f}s train, {line['eval_seconds']:.1f}s eval")
