"""Conditioning a pretrained base until the oracle signs it off (`lmcoh pretrain --base`).

docs/theory.md, "A language model as a policy": prompted with ``<success>`` the conditioned model
should give G(p), and with no goal p. Both are known exactly, so training checks them: every
few steps `OracleCheck` tabulates the policy (lmcoh.lm.tabulate) and stops once both are within
the tolerance in total variation. `plan_conditioning` sizes the run before it starts: the
batch (as many transcripts as fit a step's budget of FLOPs and memory when each distinct one is
run once, see lmcoh.lm.trainer, so a small task trains on whole-data gradients), the budget of steps, how
often to check, and what it will cost (lmcoh.lm.cost).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from ..oracle import exact
from ..tasks.task import Task
from .cost import ModelShape, TrainingCost, format_seconds, training_rate
from .pretrain import LEAST_BATCH
from .tabulate import tabulate
from .text import Layout

CHECK_SHARE = 0.1    # the oracle's checks take about this share of the training time


def plan_conditioning(config, examples: list, labelled_goals: list[str], shape: ModelShape, world: int) -> dict:
    """The batch, the budget of steps, how often the oracle checks, and the cost of a run.

    ``examples`` are the training examples, the labelled ones first (their goals
    ``labelled_goals``) and then the no-goal ones. A step runs the distinct transcripts of its
    batch with shared prefixes once (lmcoh.lm.trainer): about the expected distinct tokens times
    the data's own share of them that prefix trees keep. The batch is ``config.batch_size``,
    else `sized_batch` to the model's step budget (`ModelShape.step_tokens`); the budget of
    steps ``config.max_steps``, or ``config.epochs`` passes over the data when given. A check tabulates the success and no-goal policies: about the tokens of the
    distinct success and no-goal transcripts, shared prefixes once; it comes every so many
    steps that checks take about `CHECK_SHARE` of the time.
    """
    parameters = shape.parameters
    distinct = {tuple(ids) for ids, _ in examples}
    shared = prefix_tokens(distinct) / sum(map(len, distinct))  # lmcoh.lm.trainer runs prefixes once
    batch = config.batch_size or sized_batch(examples, world, shape.step_tokens() / shared)
    steps = math.ceil(config.epochs * len(examples) / batch) if config.epochs is not None else config.max_steps
    tabulated = [ids for goal, (ids, _) in zip(labelled_goals, examples) if goal == "success"]
    tabulated += [ids for ids, _ in examples[len(labelled_goals):]]
    step = TrainingCost(parameters, shared * expected_distinct_tokens(examples, batch), 1,
                        2 * prefix_tokens(tabulated), 1)
    reference = 100.0  # GFLOP/s: the interval follows the ratio of the two costs, not this machine's speed
    every = max(1, math.ceil(step.check_seconds(reference) / (CHECK_SHARE * step.step_seconds(reference))))
    cost = TrainingCost(parameters, step.tokens_per_step, steps, step.check_tokens, math.ceil(steps / every))
    return {"batch_size": batch, "max_steps": steps, "check_every": every, "examples": len(examples),
            "distinct": len(distinct), "cost": cost,
            "estimate": {"parameters": parameters, "step_token_budget": round(shape.step_tokens()),
                         "tokens_per_step": round(cost.tokens_per_step, 1),
                         "max_steps": steps, "check_every": every, "max_tokens": round(cost.tokens),
                         "max_flops": cost.flops}}


def sized_batch(examples: list, world: int, budget: float, least: int = LEAST_BATCH) -> int:
    """The most transcripts per batch (a multiple of ``world``) whose distinct tokens, each distinct
    transcript run once, are expected to fit ``budget``; at least ``least`` (or all there are)."""
    lo, hi = 1, len(examples)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if expected_distinct_tokens(examples, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    batch = max(lo, min(least, len(examples)))
    return max(world, batch - batch % world)


def expected_distinct_tokens(examples: list, batch: int) -> float:
    """Expected tokens of the distinct transcripts in a batch of ``batch`` drawn without replacement."""
    counts: dict[tuple, int] = {}
    for ids, _ in examples:
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    n, batch = len(examples), min(batch, len(examples))
    total = 0.0
    for ids, m in counts.items():
        # P(none of the m copies is drawn) = C(n - m, batch) / C(n, batch)
        absent = 0.0 if n - m < batch else math.exp(math.lgamma(n - m + 1) - math.lgamma(n - m - batch + 1)
                                                     - math.lgamma(n + 1) + math.lgamma(n - batch + 1))
        total += len(ids) * (1.0 - absent)
    return total


def prefix_tokens(sequences: list[list[int]]) -> int:
    """Tokens of the distinct ``sequences`` with shared prefixes counted once (the size of their trie)."""
    total, previous = 0, ()
    for seq in sorted({tuple(s) for s in sequences}):
        shared = next((i for i, (a, b) in enumerate(zip(seq, previous)) if a != b), min(len(seq), len(previous)))
        total += len(seq) - shared
        previous = seq
    return total


def estimate_line(base: str, task: Task, plan: dict, bf16: bool) -> str:
    """The cost estimate printed before conditioning starts."""
    rate = training_rate(bf16)
    cost = plan["cost"]
    return (f"conditioning {base} ({cost.parameters / 1e6:.1f}M parameters) on {task.name}: {plan['examples']} "
            f"transcripts ({plan['distinct']} distinct), batch {plan['batch_size']} (~{cost.tokens_per_step:.0f} "
            f"tokens a step, shared prefixes once); at most {plan['max_steps']} steps, the oracle checking every "
            f"{plan['check_every']}: {cost.tokens / 1e6:.2f}M tokens, {cost.flops / 1e12:.1f} TFLOP, at most "
            f"{format_seconds(cost.seconds(rate))} here ({'bf16' if bf16 else 'fp32'} GEMMs at {rate:.0f} GFLOP/s)")


def conditioning_tv(loaded, task: Task, layout: Layout) -> tuple[float, float]:
    """TV of ``loaded``'s tabulated policy to the exact G(p) prompted with ``<success>``, and to p
    with no goal."""
    p = exact.prior_policy(task)
    return (exact.tv_distance(task, tabulate(loaded, task, "success", layout=layout).policy,
                              exact.goal_condition(task, p)),
            exact.tv_distance(task, tabulate(loaded, task, "none", layout=layout).policy, p))


@contextmanager
def tokens_merged(model):
    """peft's trainable-token layers merged into their weights for a while: unmerged, every forward
    copies the whole embedding matrix to put the trained rows in (a tenth of a second on a
    135M model); unmerging writes the original rows back, exactly."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            layer.unmerge()


class OracleCheck(TrainerCallback):
    """Tabulate the policy every ``every`` steps (and at the last) and stop training once both TVs
    of `conditioning_tv` are within ``tolerance``. Training ends on the best weights checked (the
    smaller worse TV), so a run whose budget runs out ends on its closest model, not its last."""

    def __init__(self, loaded, task: Task, layout: Layout, tolerance: float, every: int, progress: bool = False):
        self.loaded, self.task, self.layout = loaded, task, layout
        self.tolerance, self.every, self.progress = tolerance, every, progress
        self.params = [p for p in loaded.model.parameters() if p.requires_grad]
        self.checks: list[tuple[int, float, float]] = []  # (step, TV to G(p), TV to p)
        self.best: tuple[int, float, float] | None = None
        self._best_weights: list[torch.Tensor] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every and state.global_step < state.max_steps:
            return
        model = self.loaded.model
        model.eval()
        with tokens_merged(model):
            tv = conditioning_tv(self.loaded, self.task, self.layout)
        model.train()
        self.checks.append((state.global_step, *tv))
        if self.best is None or max(tv) < max(self.best[1:]):
            self.best = (state.global_step, *tv)
            self._best_weights = [p.detach().clone() for p in self.params]
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"step {state.global_step}: TV to G(p) {tv[0]:.4f}, to p {tv[1]:.4f} "
                       f"(tolerance {self.tolerance:g})", file=sys.stderr)
        if max(tv) <= self.tolerance:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._best_weights is not None:
            with torch.no_grad():
                for p, best in zip(self.params, self._best_weights):
                    p.copy_(best)

    def verdict(self, steps: int) -> dict:
        """What lmcoh.json records: the tolerance, the TVs of the model kept, the steps trained."""
        step, tv_success, tv_none = self.best
        return {"tolerance": self.tolerance, "tv_success_to_g": tv_success, "tv_none_to_p": tv_none,
                "within_tolerance": max(tv_success, tv_none) <= self.tolerance, "steps": steps,
                "kept_step": step, "check_every": self.every, "checks": [list(c) for c in self.checks]}
