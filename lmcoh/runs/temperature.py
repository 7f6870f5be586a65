"""Temperature versus retraining: what k rounds of retraining buy, and what alpha = k costs.

docs/theory.md, "Three ways to apply optimisation pressure". Retraining k times gives G^k(p);
inference-time reward temperature alpha = k gives pi_alpha = p(. | O^alpha = 1), which one
realises with the prior alone by rejection sampling: draw an episode from p, accept it with
probability prod q^alpha. Theorem 5.9: the two are equal for deterministic dynamics; for
stochastic dynamics temperature also rewards lucky transitions and they part ways.

For k = 0..K (K = rounds + 1) recipes/temperature_vs_retraining.py puts side by side

* exact:    G^k(p), pi_alpha (alpha = k), their TV, and the fold / fold_ratio / cumulative sequences;
* LM retraining: the prior LM prompted with no goal (k = 0, that is p), with ``<success>``
  (k = 1, G(p)), and the self-trained model after round k - 1 (k >= 2, G^k(p));
* LM rejection sampling: episodes from the prior LM prompted with no goal, accepted with
  probability prod q^k, sampled until ``rejection_episodes`` are accepted, with the cost
  (proposals per accepted episode, seconds);
* LM logit temperature 1/k on the success-prompted prior (what people often reach for
  instead; it sharpens G(p), it does not condition on k successes).

Output directory (built in ``OUTPUT_DIR.partial`` and renamed into place when complete, so a
crashed run leaves no half-written OUTPUT_DIR, and a rerun resumes its self-training)::

    comparison.json   {"task", "deterministic", "rows": [one per k]}
    details.json      the exact sequences, per-k distances to the exact targets, costs
    report.md         tables and the reading, with success.png, tv.png, cost.png
    self_train/       the self-training run, when none was given with --selftrain_dir

This module holds the pieces the recipe's loop calls.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .. import io
from ..errors import RunError
from ..oracle import exact, klrl
from ..tasks.task import Task
from .arguments import SelfTrainArguments, TemperatureArguments
from .selftrain import SelfTraining


# ---- exact part (numpy only) -------------------------------------------------------------------
def exact_comparison(task: Task, K: int, epsilon: float = klrl.EPSILON) -> dict:
    """The exact sequences k = 0..K: successes, TV retrain vs temperature (and vs each fold, and KL-RL),
    and the expected proposals per accepted episode of rejection sampling. KL-RL with R = success is
    left out where it needs more histories than the oracle unrolls (`klrl.TooManyHistories`)."""
    seqs = {}
    for kind in exact.ALL_SEQUENCES:
        try:
            seqs[kind] = exact.sequence(task, kind, K, epsilon=epsilon)
        except klrl.TooManyHistories:
            pass
    retrain = seqs["retrain"]

    def tv(kind: str) -> list[float]:
        return [exact.tv_distance(task, g, pi) for g, pi in zip(retrain, seqs[kind])]

    return {"policies": seqs,
            "success": {kind: [exact.success(task, pi) for pi in pis] for kind, pis in seqs.items()},
            "tv_retrain_vs_temperature": tv("temperature"),
            "tv_retrain_vs_fold": tv("fold"),
            "tv_retrain_vs_fold_ratio": tv("fold_ratio"),
            "tv_retrain_vs_klrl": tv("klrl"),
            "tv_temperature_vs_klrl": [exact.tv_distance(task, t, pi) for t, pi in zip(seqs["temperature"],
                                                                                       seqs["klrl"])],
            "acceptance_rate": [exact.acceptance_rate(task, k) for k in range(K + 1)],
            "optimal_success": exact.optimal_success(task),
            "epsilon": epsilon}


def klrl_lm(task: Task, ex: dict, runs: dict[tuple[int, str], Path]) -> list[dict]:
    """The KL-RL language models (recipes/kl_rl.py runs, keyed by (k, reward)) beside the exact
    optimum at beta = 1/k from the task's prior: success, TV and costs of each run's last evaluation."""
    from ..io import read_jsonl

    out = []
    for (k, reward), path in sorted(runs.items()):
        last = read_jsonl(Path(path) / "metrics.jsonl")[-1]
        kind = next(kind for kind, r in klrl.REWARDS.items() if r == reward)
        pi = exact.policy_from_table(task, last["policy"])
        target = ex["policies"].get(kind)
        out.append({"k": k, "reward": reward, "kind": kind, "success": exact.success(task, pi),
                    "tv_to_exact": exact.tv_distance(task, pi, target[k]) if target else None,
                    "tv_to_own_target": last["tv_to_target"], "episodes_sampled": last["episodes_sampled"],
                    "gradient_steps": last["gradient_steps"], "seconds": last["train_seconds"],
                    "run_dir": str(path), "policy": last["policy"]})
    return out


# ---- rejection sampling ------------------------------------------------------------------------
Sampler = Callable[[int, int], list]  # (n, seed) -> n episodes from the prior


class ProposalPool:
    """Episodes drawn from the prior, each with one acceptance uniform, grown on demand.

    Every k scans the same pool from the start, so the k-th sampler is exactly "draw from p
    until n are accepted"; sharing the draws (common random numbers) only saves time. The
    seconds spent drawing are kept, to price each proposal.
    """

    def __init__(self, sample: Sampler, seed: int):
        self.sample, self.seed = sample, seed
        self.episodes: list = []
        self.uniforms = np.zeros(0)
        self.seconds = 0.0
        self._rng = np.random.default_rng(seed)

    def grow(self, n: int) -> None:
        t0 = time.perf_counter()
        batch = self.sample(n, self.seed + 1 + len(self.episodes))
        self.seconds += time.perf_counter() - t0
        self.episodes.extend(batch)
        self.uniforms = np.concatenate([self.uniforms, self._rng.random(len(batch))])

    @property
    def seconds_per_proposal(self) -> float:
        return self.seconds / len(self.episodes) if self.episodes else math.nan


@dataclass
class Rejection:
    """What rejection sampling at one alpha produced and cost."""

    episodes: list            # the accepted ones
    proposals: int            # prior episodes drawn to get them
    seconds: float            # proposals x seconds per proposal

    @property
    def samples_per_episode(self) -> float:
        return self.proposals / len(self.episodes) if self.episodes else math.inf

    @property
    def seconds_per_episode(self) -> float:
        return self.seconds / len(self.episodes) if self.episodes else math.inf


def rejection_sample(pool: ProposalPool, alpha: float, n: int, max_proposals: int) -> Rejection:
    """Accept prior episode i when u_i < (prod q)^alpha, until ``n`` are accepted (or
    ``max_proposals`` are drawn). alpha = 0 accepts everything, q = 0 included."""
    accepted: list[int] = []
    scanned = 0
    while len(accepted) < n and scanned < max_proposals:
        if scanned == len(pool.episodes):
            rate = len(accepted) / scanned if accepted else 0.0
            want = 1.1 * (n - len(accepted)) / rate if rate > 0 else n
            pool.grow(int(min(max(want, 256), max_proposals - scanned)))
        end = min(len(pool.episodes), max_proposals)
        w = np.array([ep.success_prob for ep in pool.episodes[scanned:end]])
        ok = pool.uniforms[scanned:end] < (np.ones_like(w) if alpha == 0 else w ** alpha)
        hits = scanned + np.flatnonzero(ok)
        need = n - len(accepted)
        accepted.extend(hits[:need].tolist())
        scanned = int(hits[need - 1]) + 1 if len(hits) >= need else end
    return Rejection([pool.episodes[i] for i in accepted], scanned, scanned * pool.seconds_per_proposal)


def empirical_policy(task: Task, episodes: list) -> exact.Policy:
    """Action frequencies per (step, state) over ``episodes``; unvisited states keep the prior."""
    counts = [np.zeros(len(layer.actions)) for layer in task.layers]
    where = [{int(s): i for i, s in enumerate(layer.states)} for layer in task.layers]
    for ep in episodes:
        for t, (s, a) in enumerate(zip(ep.states, ep.actions)):
            layer = task.layers[t]
            counts[t][layer.start[where[t][s]] + a - task.action_ptr[s]] += 1
    policy = []
    for c, p, layer in zip(counts, exact.prior_policy(task), task.layers):
        total = np.repeat(layer.by_state.sum(c), layer.by_state.counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            policy.append(np.where(total > 0, c / total, p))
    return policy


# ---- the run -----------------------------------------------------------------------------------
def check_comparison(cfg: TemperatureArguments, output_dir: str, task: Task) -> None:
    """`RunError` (one line) for a comparison that cannot run, before any work."""
    rate = exact.acceptance_rate(task, cfg.rounds + 1)
    if rate * cfg.max_proposals < cfg.rejection_episodes:
        need = "inf" if rate == 0 else f"{cfg.rejection_episodes / rate:.0f}"
        raise RunError(
            f"rejection sampling at alpha = {cfg.rounds + 1} accepts {rate:.3g} of the proposals, so "
            f"{cfg.rejection_episodes} episodes need about {need} of them, more than "
            f"max_proposals = {cfg.max_proposals}; lower rounds or rejection_episodes, or raise max_proposals")
    out = io.check_output(output_dir, cfg.overwrite, "output_dir")
    if cfg.overwrite and out.is_dir() and any(out.iterdir()) and not (out / "comparison.json").is_file():
        raise RunError(f"output_dir {out} holds something other than an earlier comparison; choose another "
                       "--output_dir (--overwrite replaces only an earlier comparison)")
    if cfg.selftrain_dir is not None:
        st = Path(cfg.selftrain_dir)
        if cfg.overwrite and out.resolve() in st.resolve().parents:
            raise RunError(f"selftrain_dir {st} lies inside output_dir {out}, which --overwrite "
                           "would delete; copy it elsewhere first")
        done = SelfTraining.from_directory(st)
        if done.task.to_spec() != task.to_spec():
            raise RunError(f"selftrain_dir {st} self-trained task {done.task.name!r}, not {task.name!r}")


def selftrain_args(cfg: TemperatureArguments) -> SelfTrainArguments:
    """The self-training run this comparison makes: the shared settings."""
    return SelfTrainArguments(**{f.name: getattr(cfg, f.name) for f in fields(SelfTrainArguments)})


def klrl_args(cfg: TemperatureArguments, sft, model_args, k: int, reward: str, prior: str, out: Path) -> tuple:
    """The (`KLRLArguments`, `PolicyGRPOConfig`, `PolicyModelConfig`) of the KL-RL run this comparison
    makes at beta = 1/k with ``reward``: the shared settings, from the self-training run's ``prior``,
    evaluated at its end, into ``out``."""
    import dataclasses

    from ..lm.configs import PolicyGRPOConfig
    from .arguments import KLRLArguments, RunArguments

    args = KLRLArguments(**{f.name: getattr(cfg, f.name) for f in fields(RunArguments)}, reward=reward,
                         q_floor=cfg.klrl_q_floor, evaluate_every=cfg.klrl_max_steps, kappa_delta=cfg.delta)
    args.overwrite = False  # the comparison's work directory resumes its runs
    grpo = PolicyGRPOConfig(output_dir=str(out), beta=1.0 / k, max_steps=cfg.klrl_max_steps, seed=sft.seed,
                            learning_rate=cfg.klrl_learning_rate, global_batch_size=cfg.klrl_global_batch_size,
                            disable_tqdm=sft.disable_tqdm)
    return args, grpo, dataclasses.replace(model_args, model_name_or_path=prior)


@dataclass
class Methods:
    """What the model side supplies to the comparison, for k = 0..K.

    ``sample(n, seed)`` draws prior episodes (rejection sampling's proposals);
    ``retrained(k)`` and ``logit(k)`` give (policy per (step, state), success probability)
    of the retrained model and of logit temperature 1/k; ``retrain_seconds[k]`` is the one-off
    cost of the retrained model at k.
    """

    sample: Sampler
    retrained: Callable[[int], tuple[exact.Policy, float]]
    logit: Callable[[int], tuple[exact.Policy, float]]
    retrain_seconds: list[float]
    retrain_episodes: list[int]  # episodes sampled, and gradient steps taken, up to the model used at k
    retrain_steps: list[int]


def comparison_entry(task: Task, k: int, ex: dict, rejection: "Rejection", retrained: tuple[exact.Policy, float],
                     logit: tuple[exact.Policy, float], retrain_seconds: float,
                     pool: "ProposalPool", retrain_cost: tuple[int, int] = (0, 0)) -> tuple[dict, dict]:
    """Row k of comparison.json, and k's entry of details.json's ``lm`` list."""
    targets = ex["policies"]
    rej_pi = empirical_policy(task, rejection.episodes)
    (retrained_pi, retrained_success), (logit_pi, logit_success) = retrained, logit
    row = {
        "k": k,
        "exact_retrain_success": ex["success"]["retrain"][k],
        "exact_temperature_success": ex["success"]["temperature"][k],
        "exact_tv_retrain_vs_temperature": ex["tv_retrain_vs_temperature"][k],
        "exact_klrl_success": ex["success"]["klrl"][k],
        "exact_klrl_success_success": ex["success"]["klrl_success"][k] if "klrl_success" in ex["success"] else None,
        "exact_tv_temperature_vs_klrl": ex["tv_temperature_vs_klrl"][k],
        "lm_retrain_success": float(retrained_success),
        # the accepted episodes' action frequencies acted out in the task: their own mean
        # prod q would count the lucky transitions that acceptance selected for
        "lm_rejection_success": exact.success(task, rej_pi),
        "lm_tv_retrain_vs_rejection": exact.tv_distance(task, retrained_pi, rej_pi),
        "lm_logit_temperature_success": float(logit_success),
        "rejection_samples_per_episode": rejection.samples_per_episode,
        "retrain_seconds": retrain_seconds,
        "retrain_episodes_sampled": retrain_cost[0], "retrain_gradient_steps": retrain_cost[1],
        "rejection_seconds_per_episode": rejection.seconds_per_episode}
    detail = {
        "k": k,
        "retrain_tv_to_exact": exact.tv_distance(task, retrained_pi, targets["retrain"][k]),
        "rejection_tv_to_exact": exact.tv_distance(task, rej_pi, targets["temperature"][k]),
        "logit_tv_to_exact_retrain": exact.tv_distance(task, logit_pi, targets["retrain"][k]),
        "logit_tv_to_exact_temperature": exact.tv_distance(task, logit_pi, targets["temperature"][k]),
        "accepted": len(rejection.episodes), "proposals": rejection.proposals,
        "expected_samples_per_episode": _inverse(ex["acceptance_rate"][k]),
        "break_even_episodes": break_even(retrain_seconds, rejection.seconds_per_episode,
                                          pool.seconds_per_proposal),
        "root": _root_policies(task, {"exact retrain": targets["retrain"][k],
                                      "exact temperature": targets["temperature"][k],
                                      "exact KL-RL, R = sum log q": targets["klrl"][k],
                                      "LM retrained": retrained_pi, "LM rejection": rej_pi,
                                      "LM logit temperature": logit_pi})}
    return row, detail


def comparison_objects(task: Task, K: int, ex: dict, rows: list[dict], lm: list[dict],
                       pool: "ProposalPool", klrl_runs: list[dict] = ()) -> tuple[dict, dict]:
    """The comparison.json object (one row per k) and the details.json object; the KL-RL language
    models (`klrl_lm`) fill their rows' ``lm_klrl_success`` / ``lm_klrl_success_success``."""
    for run in klrl_runs:
        rows[run["k"]]["lm_" + run["kind"] + "_success"] = run["success"]
    comparison = {"task": task.name, "deterministic": bool(task.deterministic), "rows": rows}
    details = {
        "task": task.name, "K": K, "optimal_success": ex["optimal_success"],
        "uniform_prior": task.uniform_prior, "one_decision": task.steps == 1,
        "seconds_per_proposal": pool.seconds_per_proposal, "proposals_drawn": len(pool.episodes),
        "exact": {"success": ex["success"], "acceptance_rate": ex["acceptance_rate"],
                  "tv_retrain_vs_temperature": ex["tv_retrain_vs_temperature"],
                  "tv_retrain_vs_fold": ex["tv_retrain_vs_fold"],
                  "tv_retrain_vs_fold_ratio": ex["tv_retrain_vs_fold_ratio"],
                  "tv_retrain_vs_klrl": ex["tv_retrain_vs_klrl"],
                  "tv_temperature_vs_klrl": ex["tv_temperature_vs_klrl"], "epsilon": ex["epsilon"]},
        "lm": lm, "klrl_lm": list(klrl_runs)}
    return comparison, details


def lm_methods(cfg: TemperatureArguments, run: SelfTraining, progress: bool = True) -> tuple[Methods, int, dict]:
    """The language models of a finished self-training ``run`` as `Methods`, the K they reach, and
    where they came from. k = 0: the prior with no goal (p); k = 1: the prior prompted with
    ``<success>`` (G(p), no retraining needed); k >= 2: round k-1's model prompted with ``<success>``."""
    from ..lm.rollout import sample_episodes
    from ..lm.tabulate import tabulate

    rounds = run.run.complete_rounds()
    K = min(cfg.rounds, len(rounds) - 1) + 1
    prior, layout, task, seed = run.trained_model(0), run.layout, run.task, run.sft.seed

    def table(loaded, goal: str, temperature: float = 1.0) -> tuple[exact.Policy, float]:
        lm = tabulate(loaded, task, goal, temperature, layout, cfg.max_histories, seed=seed)
        return lm.policy, lm.success

    def sample(n: int, seed: int) -> list:
        return sample_episodes(prior, task, n, goal="none", seed=seed, layout=layout,
                               batch_size=cfg.sample_batch_size, progress=progress)

    @functools.cache
    def logit(k: int) -> tuple[exact.Policy, float]:
        return table(prior, "none") if k == 0 else table(prior, "success", 1.0 / k)

    def retrained(k: int) -> tuple[exact.Policy, float]:
        if k <= 1:
            return logit(k)
        return table(run.trained_model(k - 1), "success")

    seconds = [sum(r["sample_seconds"] + r["train_seconds"] for r in rounds[1:k]) for k in range(K + 1)]
    episodes = [sum(r["episodes_sampled"] for r in rounds[1:k]) for k in range(K + 1)]
    steps = [sum(r.get("gradient_steps", 0) for r in rounds[1:k]) for k in range(K + 1)]
    source = {"prior_model": run.base, "selftrain_dir": str(run.path), "prompt": layout.mode, "format": layout.format}
    return Methods(sample, retrained, logit, seconds, episodes, steps), K, source


def _inverse(x: float) -> float:
    return 1.0 / x if x > 0 else math.inf


def break_even(retrain_seconds: float, rejection_seconds: float, direct_seconds: float) -> float:
    """Episodes after which retraining once is cheaper than rejection sampling every time.

    Retraining costs ``retrain_seconds`` once, then ``direct_seconds`` per episode (one sample
    from the retrained model, priced like one prior proposal); temperature costs
    ``rejection_seconds`` per episode. inf when rejection is no dearer per episode.
    """
    extra = rejection_seconds - direct_seconds
    if retrain_seconds <= 0:
        return 0.0
    return retrain_seconds / extra if extra > 0 else math.inf


def _root_policies(task: Task, policies: dict[str, exact.Policy]) -> dict | None:
    """The action probabilities at the single start state, per method (None if several starts)."""
    layer = task.layers[0]
    if len(layer.states) != 1:
        return None
    names = [task.action_names[a] for a in layer.actions]
    return {"state": task.state_names[int(layer.states[0])],
            "actions": names,
            "probs": {label: [float(x) for x in pi[0]] for label, pi in policies.items()}}
