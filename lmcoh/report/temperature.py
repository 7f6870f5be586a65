"""The comparison of the four pressures (retraining, temperature, KL-regularised RL with R = sum log q
and with R = success): comparison.json, details.json, report.md and its plots (success, TV, cost,
the policies side by side), with a reading computed from the numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..io import write_json, write_text
from ..oracle import exact, klrl
from ..tasks.task import Task
from .plots import pyplot, save
from .tables import fmt, markdown_table
from .taskgraph import plot_policies

# Below this the exact TV between retraining and temperature counts as zero (float rounding).
TV_ZERO = 1e-9


def write_outputs(out: Path, comparison: dict, details: dict, task: Task | None = None) -> None:
    """comparison.json, details.json, the plots and report.md into ``out``; with the ``task``
    (and k reaching 2), a picture of it at k = 2 under retraining and under temperature."""
    write_json(out / "comparison.json", comparison, indent=1)
    write_json(out / "details.json", details, indent=1)
    plots = write_plots(out, comparison, details)
    if task is not None and details["K"] >= 2:
        plots.append(k2_plot(out, task, details["exact"].get("epsilon", klrl.EPSILON)))
    write_text(out / "report.md", report_markdown(comparison, details, plots))


def k2_plot(out: Path, task: Task, epsilon: float = klrl.EPSILON) -> Path:
    """policies_k2.png: the task under the four pressures at k = 2, exactly, side by side: G^2(p),
    pi_alpha at alpha = 2, and the KL-RL optima at beta = 1/2 for both rewards; on a stochastic task
    (the lottery) the picture shows where temperature rewards lucky transitions."""
    path = out / "policies_k2.png"
    panels = [("retraining: G^2(p)", exact.sequence(task, "retrain", 2)[2]),
              ("temperature: pi_alpha, alpha = 2", exact.temperature_policy(task, 2.0)),
              ("KL-RL, beta = 1/2, R = sum log q", klrl.optimum(task, 0.5, "log_q", epsilon=epsilon).policy)]
    try:
        panels.append(("KL-RL, beta = 1/2, R = success", klrl.optimum(task, 0.5, "success").policy))
    except klrl.TooManyHistories:
        pass
    plot_policies(path, task, panels, title=f"{task.name} at k = 2, exactly")
    return path


def write_plots(out: Path, comparison: dict, details: dict) -> list[Path]:
    """success.png (every method), tv.png (retraining vs temperature), cost.png (cost and break-even)."""
    plt = pyplot()
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

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for key, label, style in (
            ("retrain", "exact retrain G^k(p)", {"color": "C0", "linestyle": "--", "marker": "x"}),
            ("temperature", "exact temperature pi_alpha", {"color": "C1", "linestyle": "--", "marker": "x"}),
            ("klrl", "exact KL-RL, R = sum log q", {"color": "C6", "linestyle": "--", "marker": "x"}),
            ("klrl_success", "exact KL-RL, R = success", {"color": "C7", "linestyle": "--", "marker": "x"}),
            ("cumulative", "exact cumulative fold", {"color": "C4", "linestyle": ":", "marker": "."}),
            ("fold", "exact fold (Def 5.7 as printed)", {"color": "C5", "linestyle": ":", "marker": "."})):
        if key in ex:
            ax.plot(ks, ex[key], label=label, **style)
    for kind, colour in (("klrl", "C6"), ("klrl_success", "C7")):
        runs = [r for r in details.get("klrl_lm", []) if r["kind"] == kind]
        if runs:
            ax.plot([r["k"] for r in runs], [r["success"] for r in runs], "D", color=colour,
                    label=f"LM KL-RL, R = {'sum log q' if kind == 'klrl' else 'success'}")
    for key, label, style in (
            ("lm_retrain_success", "LM retrained", {"color": "C0", "marker": "o"}),
            ("lm_rejection_success", "LM rejection sampling", {"color": "C1", "marker": "s"}),
            ("lm_logit_temperature_success", "LM logit temperature 1/k", {"color": "C2", "marker": "^"})):
        ax.plot(ks, [r[key] for r in rows], label=label, **style)
    ax.axhline(details["optimal_success"], color="grey", linestyle=":", label="optimum")
    axes(ax, f"Success vs k on {comparison['task']}", "success probability")
    paths = [save(fig, out / "success.png")]

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    ax.plot(ks, [r["exact_tv_retrain_vs_temperature"] for r in rows], "x--", color="C3",
            label="exact TV(G^k(p), pi_alpha)")
    ax.plot(ks, [r["lm_tv_retrain_vs_rejection"] for r in rows], "o-", color="C3",
            label="LM TV(retrained, rejection sampling)")
    axes(ax, "Retraining vs temperature", "visit-weighted TV")
    paths.append(save(fig, out / "tv.png"))

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
    paths.append(save(fig, out / "cost.png"))
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
    lines += _klrl_reading(rows, details)
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


def _klrl_reading(rows: list[dict], details: dict) -> list[str]:
    """KL-RL against temperature and retraining, exactly and with the LM."""
    to_t, to_r = details["exact"].get("tv_temperature_vs_klrl"), details["exact"].get("tv_retrain_vs_klrl")
    if not to_t:
        return []
    floor = details["exact"].get("epsilon", 0.0)  # q = 0 counts as epsilon in KL-RL's reward: pi moves by ~epsilon^k
    if max(to_t) <= max(TV_ZERO, floor):
        lines = [f"Exactly, KL-RL at beta = 1/k equals temperature alpha = k at every k up to its floor on q (largest "
                 f"TV {max(to_t):.1e}, epsilon = {floor:g}), as it must with deterministic dynamics: only the backup "
                 "over the environment's move differs."]
    else:
        lines = [f"Exactly, KL-RL at beta = 1/k parts ways with temperature (largest TV {fmt(max(to_t))}) and with "
                 f"retraining (largest TV {fmt(max(to_r))}): its backup averages the environment's move, where "
                 "temperature's is optimistic and retraining averages success probabilities. At k = "
                 f"{rows[-1]['k']} its success is {fmt(rows[-1]['exact_klrl_success'])}, retraining's "
                 f"{fmt(rows[-1]['exact_retrain_success'])}, temperature's {fmt(rows[-1]['exact_temperature_success'])}."]
    for run in details.get("klrl_lm", []):
        lines.append(f"The LM trained by KL-RL at k = {run['k']} with R = "
                     f"{'sum log q' if run['kind'] == 'klrl' else 'success'} ends at TV {fmt(run['tv_to_exact'])} from "
                     f"the exact optimum (TV {fmt(run['tv_to_own_target'])} from the optimum from the prior LM it "
                     f"regularises towards), success {fmt(run['success'])}, after {run['episodes_sampled']} episodes "
                     f"and {run['gradient_steps']} gradient steps ({run['seconds']:.0f} s).")
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
    pressures = four_pressures(comparison, details)
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
        *([f"## Four pressures on {comparison['task']}", "",
           "KL-RL maximises E[R] - (1/k) KL(pi || p) (recipes/kl_rl.py); its exact optimum is from the task's "
           "prior, the LM's own run regularises towards the prior LM. Costs: episodes sampled from a model, "
           "gradient steps, seconds (retraining: its rounds up to the model used at k; temperature: the "
           f"proposals rejection sampling drew for {lm[0]['accepted']} accepted episodes; pretraining the prior, "
           "common to all, is not counted).", "", pressures, ""] if pressures else []),
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


def four_pressures(comparison: dict, details: dict) -> str:
    """The table of the four pressures at each k where the LM KL-RL ran: exact and LM success, the
    LM's TV to its exact policy, and the costs; "" without KL-RL runs."""
    runs = details.get("klrl_lm", [])
    rows, lm = comparison["rows"], details["lm"]
    out = []
    for k in sorted({r["k"] for r in runs}):
        row, d = rows[k], lm[k]
        out.append([k, "retraining G^k(p)", fmt(row["exact_retrain_success"]), fmt(row["lm_retrain_success"]),
                    fmt(d["retrain_tv_to_exact"]), row.get("retrain_episodes_sampled", "-"),
                    row.get("retrain_gradient_steps", "-"), fmt(row["retrain_seconds"], 1)])
        out.append([k, "temperature alpha = k", fmt(row["exact_temperature_success"]), fmt(row["lm_rejection_success"]),
                    fmt(d["rejection_tv_to_exact"]), d["proposals"], 0,
                    fmt(row["rejection_seconds_per_episode"] * d["accepted"], 1)])
        for run in (r for r in runs if r["k"] == k):
            exact_s = row["exact_klrl_success"] if run["kind"] == "klrl" else row["exact_klrl_success_success"]
            out.append([k, f"KL-RL beta = 1/k, R = {'sum log q' if run['kind'] == 'klrl' else 'success'}",
                        fmt(exact_s), fmt(run["success"]), fmt(run["tv_to_exact"]), run["episodes_sampled"],
                        run["gradient_steps"], fmt(run["seconds"], 1)])
    if not out:
        return ""
    return markdown_table(["k", "pressure", "exact S", "LM S", "TV(LM, exact)", "episodes sampled",
                           "gradient steps", "seconds"], out)
