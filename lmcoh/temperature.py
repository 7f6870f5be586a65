"""Temperature versus retraining: what k rounds of retraining buy, and what alpha = k costs.

THEORY.md, "Three ways to apply optimisation pressure". Retraining k times gives G^k(p);
inference-time reward temperature alpha = k gives pi_alpha = p(. | O^alpha = 1), which one
realises with the prior alone by rejection sampling: draw an episode from p, accept it with
probability prod q^alpha. Theorem 5.9: the two are equal for deterministic dynamics; for
stochastic dynamics temperature also rewards lucky transitions and they part ways.

For k = 0..K (K = rounds + 1) this module puts side by side

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

    comparison.json   {"task", "deterministic", "rows": [one per k]} (issue 6's fields)
    details.json      the exact sequences, per-k distances to the exact targets, costs
    report.md         tables and the reading, with success.png, tv.png, cost.png
    self_train/       the self-training run, when none was given with --selftrain_dir
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from . import exact
from .library import load_task
from .report import fmt, markdown_table
from .selftrain import SelfTrainConfig, SelfTrainError, complete_rounds, validate
from .task import Task

# Below this the exact TV between retraining and temperature counts as zero (float rounding).
TV_ZERO = 1e-9


class TemperatureError(SelfTrainError):
    """A bad comparison config or directory; the message is one line for the user."""


@dataclass
class TemperatureConfig(SelfTrainConfig):
    """The comparison's settings. Every self-training setting applies to the self-training run
    made here when ``selftrain_dir`` is unset."""

    task: str = field(default="lottery", metadata={"help": (
        "Task: a built-in name (tasks/NAME.yaml), a task YAML path or a generator spec.")})
    output_dir: str = field(default="outputs/temperature_vs_retraining", metadata={"help": (
        "Where comparison.json, details.json, report.md and the plots go.")})
    rounds: int = field(default=3, metadata={"help": (
        "Self-training rounds R; the comparison covers k = 0..R+1 (round r's model is G^(r+1)(p)).")})
    selftrain_dir: str | None = field(default=None, metadata={"help": (
        "Reuse this self_train.py output directory (its complete rounds, up to R) instead of "
        "self-training here.")})
    rejection_episodes: int = field(default=2000, metadata={"help": (
        "Episodes rejection sampling must accept at each k.")})
    max_proposals: int = field(default=200_000, metadata={"help": (
        "Most episodes rejection sampling may draw from the prior LM at one k.")})


def check_config(cfg: TemperatureConfig, task: Task) -> TemperatureConfig:
    """Coerce and check every value (`SelfTrainError`/`TemperatureError`), before any work."""
    validate(cfg)
    for name in ("rejection_episodes", "max_proposals"):
        if not getattr(cfg, name) > 0:
            raise TemperatureError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    rate = acceptance_rate(task, cfg.rounds + 1)
    if rate * cfg.max_proposals < cfg.rejection_episodes:
        need = "inf" if rate == 0 else f"{cfg.rejection_episodes / rate:.0f}"
        raise TemperatureError(
            f"rejection sampling at alpha = {cfg.rounds + 1} accepts {rate:.3g} of the proposals, so "
            f"{cfg.rejection_episodes} episodes need about {need} of them, more than "
            f"max_proposals = {cfg.max_proposals}; lower rounds or rejection_episodes, or raise max_proposals")
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise TemperatureError(f"output_dir {out} exists; pass --overwrite to replace it or choose another")
    if cfg.selftrain_dir is not None:
        st = Path(cfg.selftrain_dir)
        if not (st / "config.yaml").is_file() or not (st / "rounds" / "0" / "metrics.json").is_file():
            raise TemperatureError(f"selftrain_dir {st} holds no complete self-training round "
                                   "(no config.yaml or rounds/0)")
        if cfg.overwrite and out.resolve() in st.resolve().parents:
            raise TemperatureError(f"selftrain_dir {st} lies inside output_dir {out}, which --overwrite "
                                   "would delete; copy it elsewhere first")
        saved = yaml.safe_load((st / "config.yaml").read_text()) or {}
        if load_task(str(saved.get("task", ""))).to_spec() != task.to_spec():
            raise TemperatureError(f"selftrain_dir {st} self-trained task {saved.get('task')!r}, "
                                   f"not {task.name!r}")
    return cfg


# ---- exact part (numpy only) -------------------------------------------------------------------
def acceptance_rate(task: Task, alpha: float) -> float:
    """E_p[prod q^alpha]: the share of prior episodes rejection sampling at ``alpha`` accepts."""
    _, V = exact.soft_values(task, exact.prior_policy(task), reward_scale=alpha)
    layer0 = task.layers[0]
    rate = float(np.sum(task.start_prob[layer0.states] * np.exp(V[0])))
    ends = task.terminal & (task.start_prob > 0)
    return rate + float(np.sum(task.start_prob[ends] * np.exp(alpha * task.terminal_logq[ends])))


def exact_comparison(task: Task, K: int) -> dict:
    """The exact sequences k = 0..K: successes, TV retrain vs temperature (and vs each fold),
    and the expected proposals per accepted episode of rejection sampling."""
    seqs = {kind: exact.sequence(task, kind, K) for kind in exact.SEQUENCES}
    retrain = seqs["retrain"]

    def tv(kind: str) -> list[float]:
        return [exact.tv_distance(task, g, pi) for g, pi in zip(retrain, seqs[kind])]

    return {"policies": seqs,
            "success": {kind: [exact.success(task, pi) for pi in pis] for kind, pis in seqs.items()},
            "tv_retrain_vs_temperature": tv("temperature"),
            "tv_retrain_vs_fold": tv("fold"),
            "tv_retrain_vs_fold_ratio": tv("fold_ratio"),
            "acceptance_rate": [acceptance_rate(task, k) for k in range(K + 1)],
            "optimal_success": exact.optimal_success(task)}


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
def selftrain_config(cfg: TemperatureConfig, output_dir: Path) -> SelfTrainConfig:
    """The self-training run this comparison makes: the shared fields, its own directory."""
    values = {f.name: getattr(cfg, f.name) for f in fields(SelfTrainConfig)}
    return SelfTrainConfig(**{**values, "output_dir": str(output_dir)})


def run(cfg: TemperatureConfig) -> Path:
    """Compare, write OUTPUT_DIR and return it. Bad input raises a one-line `SelfTrainError`
    (or `TemperatureError`), `TaskError` or `ModelError` before any work."""
    from accelerate import PartialState

    from . import selftrain

    task = load_task(cfg.task)
    check_config(cfg, task)
    out = Path(cfg.output_dir)
    work = out.with_name(out.name + ".partial")
    proc = PartialState()
    if cfg.selftrain_dir is None:
        st_dir = work / "self_train"
        selftrain.main(selftrain_config(cfg, st_dir))
    else:
        st_dir = Path(cfg.selftrain_dir)
    if proc.is_main_process:
        methods, K, source = lm_methods(cfg, task, st_dir)
        comparison, details = compare(task, K, methods, rejection_episodes=cfg.rejection_episodes,
                                      max_proposals=cfg.max_proposals, seed=cfg.seed)
        # paths inside the work directory, as they will read after the rename
        details.update({key: value.replace(str(work), str(out)) for key, value in source.items()})
        work.mkdir(parents=True, exist_ok=True)
        write_outputs(work, comparison, details)
        _replace(work, out)
    proc.wait_for_everyone()
    return out


def _replace(work: Path, out: Path) -> None:
    """Move the finished ``work`` directory to ``out`` (replacing an old one)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old)
    else:
        os.replace(work, out)


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


def compare(task: Task, K: int, methods: Methods, *, rejection_episodes: int, max_proposals: int,
            seed: int = 0) -> tuple[dict, dict]:
    """The comparison.json object (issue 6's rows) and the details.json object."""
    ex = exact_comparison(task, K)
    targets = ex["policies"]
    pool = ProposalPool(methods.sample, seed)
    rows, lm = [], []
    for k in range(K + 1):
        rej = rejection_sample(pool, float(k), rejection_episodes, max_proposals)
        rej_pi = empirical_policy(task, rej.episodes)
        (retrained, retrained_success), (logit, logit_success) = methods.retrained(k), methods.logit(k)
        rows.append({
            "k": k,
            "exact_retrain_success": ex["success"]["retrain"][k],
            "exact_temperature_success": ex["success"]["temperature"][k],
            "exact_tv_retrain_vs_temperature": ex["tv_retrain_vs_temperature"][k],
            "lm_retrain_success": float(retrained_success),
            # the accepted episodes' action frequencies acted out in the task: their own mean
            # prod q would count the lucky transitions that acceptance selected for
            "lm_rejection_success": exact.success(task, rej_pi),
            "lm_tv_retrain_vs_rejection": exact.tv_distance(task, retrained, rej_pi),
            "lm_logit_temperature_success": float(logit_success),
            "rejection_samples_per_episode": rej.samples_per_episode,
            "retrain_seconds": methods.retrain_seconds[k],
            "rejection_seconds_per_episode": rej.seconds_per_episode})
        lm.append({
            "k": k,
            "retrain_tv_to_exact": exact.tv_distance(task, retrained, targets["retrain"][k]),
            "rejection_tv_to_exact": exact.tv_distance(task, rej_pi, targets["temperature"][k]),
            "logit_tv_to_exact_retrain": exact.tv_distance(task, logit, targets["retrain"][k]),
            "logit_tv_to_exact_temperature": exact.tv_distance(task, logit, targets["temperature"][k]),
            "accepted": len(rej.episodes), "proposals": rej.proposals,
            "expected_samples_per_episode": _inverse(ex["acceptance_rate"][k]),
            "break_even_episodes": break_even(methods.retrain_seconds[k], rej.seconds_per_episode,
                                              pool.seconds_per_proposal),
            "root": _root_policies(task, {"exact retrain": targets["retrain"][k],
                                          "exact temperature": targets["temperature"][k],
                                          "LM retrained": retrained, "LM rejection": rej_pi,
                                          "LM logit temperature": logit})})
    comparison = {"task": task.name, "deterministic": bool(task.deterministic), "rows": rows}
    details = {
        "task": task.name, "K": K, "optimal_success": ex["optimal_success"],
        "uniform_prior": _uniform_prior(task), "one_decision": task.horizon == 1,
        "seconds_per_proposal": pool.seconds_per_proposal, "proposals_drawn": len(pool.episodes),
        "exact": {"success": ex["success"], "acceptance_rate": ex["acceptance_rate"],
                  "tv_retrain_vs_temperature": ex["tv_retrain_vs_temperature"],
                  "tv_retrain_vs_fold": ex["tv_retrain_vs_fold"],
                  "tv_retrain_vs_fold_ratio": ex["tv_retrain_vs_fold_ratio"]},
        "lm": lm}
    return comparison, details


def lm_methods(cfg: TemperatureConfig, task: Task, st_dir: Path) -> tuple[Methods, int, dict]:
    """The language models of a finished self-training run as `Methods`, the K they reach, and
    where they came from. k = 0: the prior with no goal (p); k = 1: the prior prompted with
    ``<success>`` (G(p), no retraining needed); k >= 2: round k-1's adapter prompted with ``<success>``."""
    from .model import check_task_fits, load_model
    from .policy import tabulate
    from .rollout import sample_episodes

    saved = yaml.safe_load((st_dir / "config.yaml").read_text()) or {}
    base = saved.get("model") or str(st_dir / "prior")
    mode = saved.get("prompt", "history")
    rounds = complete_rounds(st_dir)
    K = min(cfg.rounds, len(rounds) - 1) + 1
    prior = load_model(base)
    check_task_fits(prior, task)

    def table(loaded, goal: str, temperature: float = 1.0) -> tuple[exact.Policy, float]:
        lm = tabulate(loaded, task, goal, temperature, mode, cfg.max_histories, seed=cfg.seed)
        return lm.policy, lm.success

    def sample(n: int, seed: int) -> list:
        return sample_episodes(prior, task, n, goal="none", seed=seed, mode=mode,
                               batch_size=cfg.sample_batch_size, progress=cfg.progress)

    @functools.cache
    def logit(k: int) -> tuple[exact.Policy, float]:
        return table(prior, "none") if k == 0 else table(prior, "success", 1.0 / k)

    def retrained(k: int) -> tuple[exact.Policy, float]:
        if k <= 1:
            return logit(k)
        return table(load_model(base, adapter=str(st_dir / "rounds" / str(k - 1) / "adapter")), "success")

    seconds = [sum(r["sample_seconds"] + r["train_seconds"] for r in rounds[1:k]) for k in range(K + 1)]
    source = {"prior_model": base, "selftrain_dir": str(st_dir), "prompt": mode}
    return Methods(sample, retrained, logit, seconds), K, source


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


def _uniform_prior(task: Task) -> bool:
    return all(np.allclose(p, 1.0 / np.repeat(layer.by_state.counts, layer.by_state.counts))
               for p, layer in zip(exact.prior_policy(task), task.layers))


def _root_policies(task: Task, policies: dict[str, exact.Policy]) -> dict | None:
    """The action probabilities at the single start state, per method (None if several starts)."""
    layer = task.layers[0]
    if len(layer.states) != 1:
        return None
    names = [task.action_names[a] for a in layer.actions]
    return {"state": task.state_names[int(layer.states[0])],
            "actions": names,
            "probs": {label: [float(x) for x in pi[0]] for label, pi in policies.items()}}


# ---- outputs -----------------------------------------------------------------------------------
def _json_safe(x):
    if isinstance(x, float):
        return exact.json_number(x) if math.isinf(x) else (None if math.isnan(x) else x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(out: Path, comparison: dict, details: dict) -> None:
    """comparison.json, details.json, the plots and report.md into ``out``."""
    (out / "comparison.json").write_text(json.dumps(_json_safe(comparison), indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(_json_safe(details), indent=1) + "\n")
    plots = write_plots(out, comparison, details)
    (out / "report.md").write_text(report_markdown(comparison, details, plots))


def write_plots(out: Path, comparison: dict, details: dict) -> list[Path]:
    """success.png (every method), tv.png (retraining vs temperature), cost.png (cost and break-even)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    ks = [r["k"] for r in rows]
    ex = details["exact"]["success"]

    def axes(ax, title: str, ylabel: str, log: bool = False) -> None:
        ax.set_xlabel("k (retraining rounds = temperature alpha)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    def save(fig, name: str) -> Path:
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        return out / name

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for key, label, style in (
            ("retrain", "exact retrain G^k(p)", {"color": "C0", "linestyle": "--", "marker": "x"}),
            ("temperature", "exact temperature pi_alpha", {"color": "C1", "linestyle": "--", "marker": "x"}),
            ("cumulative", "exact cumulative fold", {"color": "C4", "linestyle": ":", "marker": "."}),
            ("fold", "exact fold (Def 5.7 as printed)", {"color": "C5", "linestyle": ":", "marker": "."})):
        ax.plot(ks, ex[key], label=label, **style)
    for key, label, style in (
            ("lm_retrain_success", "LM retrained", {"color": "C0", "marker": "o"}),
            ("lm_rejection_success", "LM rejection sampling", {"color": "C1", "marker": "s"}),
            ("lm_logit_temperature_success", "LM logit temperature 1/k", {"color": "C2", "marker": "^"})):
        ax.plot(ks, [r[key] for r in rows], label=label, **style)
    ax.axhline(details["optimal_success"], color="grey", linestyle=":", label="optimum")
    axes(ax, f"Success vs k on {comparison['task']}", "success probability")
    paths = [save(fig, "success.png")]

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    ax.plot(ks, [r["exact_tv_retrain_vs_temperature"] for r in rows], "x--", color="C3",
            label="exact TV(G^k(p), pi_alpha)")
    ax.plot(ks, [r["lm_tv_retrain_vs_rejection"] for r in rows], "o-", color="C3",
            label="LM TV(retrained, rejection sampling)")
    axes(ax, "Retraining vs temperature", "visit-weighted TV")
    paths.append(save(fig, "tv.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    left.plot(ks, [r["rejection_seconds_per_episode"] for r in rows], "s-", color="C1",
              label="temperature (rejection sampling): s per episode")
    left.axhline(details["seconds_per_proposal"], color="C0", linestyle="--",
                 label="retrained model: s per episode")
    left.plot(ks, [r["retrain_seconds"] or math.nan for r in rows], "o-", color="C0",
              label="retraining: one-off s")
    axes(left, "Inference cost per episode vs one-off retraining cost", "seconds", log=True)
    even = [(d["k"], d["break_even_episodes"]) for d in details["lm"]]
    finite = [(k, v) for k, v in even if math.isfinite(v) and v > 0]
    right.plot([k for k, _ in finite], [v for _, v in finite], "d-", color="C3")
    for k, v in finite:
        right.annotate(f"{v:.0f}", (k, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
    never = [k for k, v in even if math.isinf(v)]
    spread = max(v for _, v in finite) / min(v for _, v in finite) if finite else 1.0
    axes(right, "Break-even: episodes after which retraining is cheaper"
         + (f"\n(never at k = {never})" if never else ""), "episodes", log=spread > 10)
    paths.append(save(fig, "cost.png"))
    return paths


# ---- the reading -------------------------------------------------------------------------------
def reading(comparison: dict, details: dict) -> list[str]:
    """Sentences read off the numbers: every claim below is computed, not assumed."""
    rows = comparison["rows"]
    K = rows[-1]["k"]
    opt = details["optimal_success"]
    tv = [r["exact_tv_retrain_vs_temperature"] for r in rows]
    lines = []
    if max(tv) <= TV_ZERO:
        lines.append(f"Exactly, retraining and temperature coincide at every k (largest TV {max(tv):.1e}), "
                     "as Theorem 5.9 says for deterministic dynamics: k rounds of retraining buy exactly "
                     "what alpha = k costs at inference.")
    else:
        first = next(r["k"] for r in rows if r["exact_tv_retrain_vs_temperature"] > TV_ZERO)
        worst = max(rows, key=lambda r: r["exact_tv_retrain_vs_temperature"])
        lines.append(f"Exactly, retraining and temperature part ways from k = {first} on (TV "
                     f"{fmt(rows[first]['exact_tv_retrain_vs_temperature'])} there, largest "
                     f"{fmt(worst['exact_tv_retrain_vs_temperature'])} at k = {worst['k']}): the dynamics "
                     f"are {'deterministic' if comparison['deterministic'] else 'stochastic'}, so Theorem 5.9's "
                     "equality does not hold.")
        lines += _faster(rows, opt)
        lines += _lucky(details)
    lm_tv = [r["lm_tv_retrain_vs_rejection"] for r in rows]
    lines.append(f"With the language model, the TV between the retrained model and rejection sampling "
                 f"ranges over {fmt(min(lm_tv))}..{fmt(max(lm_tv))} for k = 0..{K}; the retrained model "
                 f"stays within TV {fmt(max(d['retrain_tv_to_exact'] for d in details['lm']))} of G^k(p) and "
                 f"rejection sampling within {fmt(max(d['rejection_tv_to_exact'] for d in details['lm']))} "
                 "of pi_alpha.")
    if K >= 2:
        d, row = details["lm"][2], rows[2]
        lines.append(f"At k = 2 the LM's TV between retrained model and rejection sampling is "
                     f"{fmt(row['lm_tv_retrain_vs_rejection'])}, the exact one {fmt(row['exact_tv_retrain_vs_temperature'])}; success "
                     f"{fmt(row['lm_retrain_success'])} retrained and {fmt(row['lm_rejection_success'])} by rejection "
                     f"(exact {fmt(row['exact_retrain_success'])} and {fmt(row['exact_temperature_success'])}).")
        to_g, to_t = d["logit_tv_to_exact_retrain"], d["logit_tv_to_exact_temperature"]
        where = (f"{fmt(to_g)} TV from G^2(p) = pi_2" if row["exact_tv_retrain_vs_temperature"] <= TV_ZERO
                 else f"{fmt(to_g)} TV from G^2(p) and {fmt(to_t)} from pi_2 "
                      f"(closest to {'G^2(p)' if to_g <= to_t else 'pi_2'})")
        lines.append(f"Logit temperature 1/2 on the success-prompted prior is {where}, with success "
                     f"{fmt(row['lm_logit_temperature_success'])}. It raises the success-prompted model's token "
                     "probabilities to the power k: no retraining and no conditioning on k successes"
                     + (". (With one decision and a uniform prior, G(p)^k happens to equal G^k(p).)"
                        if details["one_decision"] and details["uniform_prior"] else "."))
    lines += _costs(rows, details)
    fold, ratio = details["exact"]["tv_retrain_vs_fold"], details["exact"]["tv_retrain_vs_fold_ratio"]
    if details["uniform_prior"]:
        lines.append(f"The prior is uniform, so the folded sequence (Def 5.7) equals retraining "
                     f"(largest TV {max(fold):.1e}).")
    else:
        lines.append(f"The prior is not uniform: Def 5.7 read literally counts it twice and strays from "
                     f"retraining (largest TV {fmt(max(fold))}); folding log(pi/p) instead stays with it "
                     f"(largest TV {max(ratio):.1e}).")
    return lines


def _faster(rows: list[dict], opt: float) -> list[str]:
    """Which of the two moves towards the optimum faster, counted over k >= 1."""
    later = rows[1:]
    ahead = [r["k"] for r in later if r["exact_retrain_success"] > r["exact_temperature_success"] + TV_ZERO]
    behind = [r["k"] for r in later if r["exact_temperature_success"] > r["exact_retrain_success"] + TV_ZERO]
    last = rows[-1]
    gaps = (f"at k = {last['k']} retraining is {fmt(opt - last['exact_retrain_success'])} below the optimum "
            f"{fmt(opt)}, temperature {fmt(opt - last['exact_temperature_success'])}")
    if ahead and not behind:
        return [f"Retraining moves towards the optimum faster: its success is higher at every k in {ahead}; {gaps}."]
    if behind and not ahead:
        return [f"Temperature moves towards the optimum faster here: its success is higher at every k in "
                f"{behind}; {gaps}. (Its lucky outcomes happen to be the best ones on this task.)"]
    return [f"Neither moves faster throughout: retraining is ahead at k in {ahead or '[]'}, temperature at "
            f"{behind or '[]'}; {gaps}."]


def _lucky(details: dict) -> list[str]:
    """Why: at the start state, the action temperature favours most over retraining."""
    lm = details["lm"]
    if len(lm) < 3 or lm[2]["root"] is None:
        return ["Why: temperature weights each trajectory by (prod q)^alpha, outcomes of chance included, so a "
                "transition that happened to land well is rewarded alpha times over; retraining conditions "
                "on success one round at a time, averaging over transitions as the next round will meet them."]
    root = lm[2]["root"]
    g, t = root["probs"]["exact retrain"], root["probs"]["exact temperature"]
    i = int(np.argmax(np.subtract(t, g)))
    return [f"Why: temperature weights each trajectory by (prod q)^alpha, transitions' luck included, so an action "
            f"whose outcomes are sometimes very good is rewarded for its lucky draws alpha times over; retraining "
            f"weighs each action by how often it succeeds on average. At `{root['state']}`, k = 2, temperature "
            f"gives `{root['actions'][i]}` {fmt(t[i])} where retraining gives it {fmt(g[i])}."]


def _costs(rows: list[dict], details: dict) -> list[str]:
    lines = []
    for row, d in zip(rows[2:], details["lm"][2:]):
        even = d["break_even_episodes"]
        lines.append(
            f"k = {row['k']}: rejection sampling draws {fmt(row['rejection_samples_per_episode'], 2)} prior "
            f"episodes per accepted one (exact {fmt(d['expected_samples_per_episode'], 2)}), "
            f"{row['rejection_seconds_per_episode']:.3g} s each; retraining cost {fmt(row['retrain_seconds'], 1)} s "
            f"once, so it pays for itself after {fmt(even, 0)} episodes.")
    if len(rows) > 1:
        lines.append("k = 1 needs no retraining: the prior prompted with `<success>` already is G(p), which is "
                     "rejection sampling at alpha = 1 for free.")
    return lines


def report_markdown(comparison: dict, details: dict, plots: list[Path]) -> str:
    rows, lm = comparison["rows"], details["lm"]
    table = markdown_table(
        ["k", "exact retrain S", "exact temperature S", "exact TV", "LM retrained S", "LM rejection S",
         "LM TV", "LM logit-temp S", "samples / accepted", "retrain s (one-off)", "rejection s / episode",
         "break-even episodes"],
        [[r["k"], fmt(r["exact_retrain_success"]), fmt(r["exact_temperature_success"]),
          fmt(r["exact_tv_retrain_vs_temperature"]), fmt(r["lm_retrain_success"]), fmt(r["lm_rejection_success"]),
          fmt(r["lm_tv_retrain_vs_rejection"]), fmt(r["lm_logit_temperature_success"]),
          fmt(r["rejection_samples_per_episode"], 2), fmt(r["retrain_seconds"], 1),
          fmt(r["rejection_seconds_per_episode"], 4), fmt(d["break_even_episodes"], 0)]
         for r, d in zip(rows, lm)])
    fidelity = markdown_table(
        ["k", "TV(LM retrained, G^k(p))", "TV(LM rejection, pi_alpha)", "TV(LM logit-temp, G^k(p))",
         "accepted / proposals"],
        [[d["k"], fmt(d["retrain_tv_to_exact"]), fmt(d["rejection_tv_to_exact"]),
          fmt(d["logit_tv_to_exact_retrain"]), f"{d['accepted']} / {d['proposals']}"] for d in lm])
    ex = details["exact"]["success"]
    exact_table = markdown_table(
        ["k"] + list(ex) + ["TV(retrain, fold)", "TV(retrain, fold_ratio)"],
        [[k] + [fmt(ex[kind][k]) for kind in ex]
         + [f"{details['exact']['tv_retrain_vs_fold'][k]:.2g}", f"{details['exact']['tv_retrain_vs_fold_ratio'][k]:.2g}"]
         for k in range(len(rows))])
    parts = [
        f"# Temperature vs retraining on {comparison['task']}", "",
        f"Dynamics: {'deterministic' if comparison['deterministic'] else 'stochastic'}; optimum success "
        f"{fmt(details['optimal_success'])}. Retraining k times gives G^k(p) (the LM: the prior prompted with no goal "
        "at k = 0, with `<success>` at k = 1, the self-trained model after round k-1 from k = 2); temperature "
        "alpha = k is realised by rejection sampling from the prior LM (accept w.p. prod q^k); logit temperature "
        "divides the success-prompted prior's logits by 1/k.", "",
        "## Reading", "", *[f"- {line}" for line in reading(comparison, details)], "",
        "## Comparison", "", table, "",
        "## The LM against its exact targets", "", fidelity, "",
        "## Exact sequences (success)", "",
        "`fold` is Def 5.7 as printed; `fold_ratio` folds log(pi/p), which equals retraining for any prior.", "",
        exact_table, ""]
    root = [d for d in lm if d["root"] is not None]
    if root:
        head = root[0]["root"]
        parts += [f"## Action probabilities at `{head['state']}`", "", markdown_table(
            ["k", "method"] + [f"`{a}`" for a in head["actions"]],
            [[d["k"], label] + [fmt(x) for x in probs] for d in root for label, probs in d["root"]["probs"].items()]),
            ""]
    parts += ["## Cost", "",
              f"A prior episode costs {details['seconds_per_proposal']:.3g} s to sample; the retrained model "
              "is priced the same per episode. Retraining seconds are the self-training rounds' sampling and "
              "training time up to the model used at k (pretraining the prior is common to both methods and not "
              "counted).", "",
              "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    return "\n".join(parts)
