"""Temperature versus retraining: what k rounds of retraining buy, and what alpha = k costs.

    accelerate launch recipes/temperature_vs_retraining.py --config recipes/configs/temperature_vs_retraining.yaml
    python recipes/temperature_vs_retraining.py --task mountain_race --selftrain_dir outputs/self_train/mountain_race

docs/theory.md, "Three ways to apply optimisation pressure" and "A fourth pressure: KL-regularised
RL". For k = 0..K (K = rounds + 1) this puts side by side four pressures on the same prior: k rounds
of retraining (the self-trained model, G^k(p)), reward temperature alpha = k at inference
(rejection sampling from the prior LM: accept an episode w.p. prod q^k), and KL-regularised RL at
beta = 1/k with R = sum log q and with R = success (recipes/kl_rl.py, at the k of --klrl_k), each
against the exact oracle and with its cost (episodes sampled, gradient steps, seconds); and logit
temperature 1/k on the success-prompted prior. Theorem 5.9: retraining and temperature agree on
deterministic tasks and part ways on stochastic ones; KL-RL equals temperature on deterministic
tasks and differs from both on stochastic ones.
"""

import dataclasses
from pathlib import Path

from accelerate import PartialState

from kl_rl import main as kl_rl  # the recipes beside this one
from self_train import main as self_train

from lmcoh import faults
from lmcoh.io import replace_dir
from lmcoh.report.temperature import write_outputs
from lmcoh.runs import temperature as compare_
from lmcoh.runs.arguments import TemperatureArguments, make_parser, run_recipe
from lmcoh.runs.directory import locked
from lmcoh.runs.selftrain import SelfTraining
from lmcoh.tasks.library import load_task


def compare(task, K: int, methods: compare_.Methods, *, rejection_episodes: int, max_proposals: int,
            seed: int = 0, klrl_runs: dict | None = None, epsilon: float = 1e-3) -> tuple[dict, dict]:
    """The comparison.json and details.json objects for k = 0..K (``klrl_runs``: the KL-RL run
    directories by (k, reward))."""
    ex = compare_.exact_comparison(task, K, epsilon)
    pool = compare_.ProposalPool(methods.sample, seed)  # prior episodes, shared by every alpha
    rows, lm = [], []
    for k in range(K + 1):
        rejection = compare_.rejection_sample(pool, float(k), rejection_episodes, max_proposals)  # alpha = k
        retrained = methods.retrained(k)  # k rounds of retraining
        logit = methods.logit(k)          # logit temperature 1/k on the success-prompted prior
        row, detail = compare_.comparison_entry(task, k, ex, rejection, retrained, logit, methods.retrain_seconds[k],
                                                pool, (methods.retrain_episodes[k], methods.retrain_steps[k]))
        rows.append(row)
        lm.append(detail)
        faults.point("compare")
    return compare_.comparison_objects(task, K, ex, rows, lm, pool, compare_.klrl_lm(task, ex, klrl_runs or {}))


def main(script_args: TemperatureArguments, training_args, model_args) -> Path:
    """Compare, write ``training_args.output_dir`` (built beside it in NAME.partial and renamed
    into place when complete) and return it."""
    task = load_task(script_args.task)
    compare_.check_comparison(script_args, training_args.output_dir, task)  # every problem, before any work
    out = Path(training_args.output_dir)
    work = out.with_name(out.name + ".partial")
    state = PartialState()

    with locked(state, out, "comparison"):
        # 1. retraining: self-train here (resumable in NAME.partial/self_train), or reuse a finished run
        selftrain_dir = script_args.selftrain_dir
        if selftrain_dir is None:
            selftrain_dir = self_train(compare_.selftrain_args(script_args),
                                       dataclasses.replace(training_args, output_dir=str(work / "self_train")),
                                       model_args)

        # 2. KL-regularised RL from the same prior at beta = 1/k, with R = sum log q and with R = success
        selftrained = SelfTraining.from_directory(selftrain_dir, state)
        klrl_runs = {(k, reward): kl_rl(*compare_.klrl_args(script_args, training_args, model_args, k, reward,
                                                            selftrained.base, work / f"kl_rl_{reward}_k{k}"))
                     for k in script_args.klrl_k for reward in ("log_q", "success")
                     if script_args.klrl_max_steps}

        # 3. k = 0..K: rejection sampling at alpha = k, the retrained model, logit temperature 1/k
        if state.is_main_process:
            methods, K, source = compare_.lm_methods(script_args, selftrained, progress=not training_args.disable_tqdm)
            comparison, details = compare(task, K, methods, rejection_episodes=script_args.rejection_episodes,
                                          max_proposals=script_args.max_proposals, seed=training_args.seed,
                                          klrl_runs=klrl_runs, epsilon=script_args.klrl_q_floor)
            # paths inside the work directory, as they will read after the rename
            details.update({key: value.replace(str(work), str(out)) for key, value in source.items()})
            for run in details["klrl_lm"]:
                run["run_dir"] = run["run_dir"].replace(str(work), str(out))

            # 4. write the outputs, then move them into place
            work.mkdir(parents=True, exist_ok=True)
            write_outputs(work, comparison, details, task)
            replace_dir(work, out)
            print(f"report: {out / 'report.md'}", flush=True)
        state.wait_for_everyone()
    return out


if __name__ == "__main__":
    run_recipe("temperature_vs_retraining", main,
               make_parser(TemperatureArguments, "temperature_vs_retraining", __doc__,
                           output_dir="outputs/temperature_vs_retraining"))
