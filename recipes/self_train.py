"""Self-training: a goal-conditioned LM retrains on its own successful episodes, round after round.

    accelerate launch recipes/self_train.py --config recipes/configs/mountain_race.yaml
    torchrun --nproc_per_node 2 recipes/self_train.py --config recipes/configs/mountain_race.yaml
    python recipes/self_train.py --task lottery --rounds 2 --mode label --gradient_accumulation_steps 2

docs/theory.md, "Goal conditioning and retraining": pi_0 = p, pi_{k+1} = G(pi_k). Round 0 evaluates the prior
prompted with <success>, which approximates G(p). Each later round samples episodes from the
current success-prompted model, keeps the successes (--mode filter) or labels every episode
with its outcome (--mode label), fine-tunes the adapter on them with TRL's SFTTrainer, and
evaluates the model exactly against the oracle's G^(k+1)(p).
"""

import shutil
import sys
import time
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import set_seed

from lmcoh.errors import LmcohError
from lmcoh.lm.model import model_init_kwargs
from lmcoh.lm.pretrain import pretrain
from lmcoh.lm.rollout import sample_episodes
from lmcoh.lm.training import train_sft
from lmcoh.oracle import exact
from lmcoh.runs import selftrain as rounds
from lmcoh.runs.arguments import SelfTrainArguments, make_parser, parse
from lmcoh.runs.directory import RunDirectory, resolved_config


def main(script_args: SelfTrainArguments, training_args, model_args) -> Path:
    """Run (or resume) self-training into ``training_args.output_dir`` and return it."""
    task = rounds.check_inputs(script_args, training_args, model_args)  # every problem, before any work
    init = model_init_kwargs(model_args)
    state = PartialState()
    run = RunDirectory(training_args.output_dir)
    config = resolved_config(script_args, training_args, model_args)
    progress = not training_args.disable_tqdm
    batch = rounds.per_device_batch(script_args, training_args, state.num_processes)

    # The main process locks, checks and prepares the directory; every process hears its verdict.
    with run.opened(state, config, script_args.overwrite, header=rounds.config_header()) as done:
        # The prior p: the user's model, or lmcoh's built-in one, pretrained on the task's own episodes.
        base = model_args.model_name_or_path or str(run.path / "prior")
        if not model_args.model_name_or_path and not (run.path / "prior").is_dir():
            if state.is_main_process:
                print(f"pretraining the built-in prior for {task.name} into {base}", flush=True)
            pretrain(task, base, format=script_args.format or None, goal_text=script_args.goal_text,
                     episodes=script_args.pretrain_episodes, epochs=script_args.pretrain_epochs,
                     seed=training_args.seed, progress=progress)  # every process trains; the main one saves
            state.wait_for_everyone()

        targets = exact.sequence(task, "retrain", script_args.rounds + 1)  # round k's target: G^(k+1)(p)
        for k in range(done, script_args.rounds + 1):
            set_seed(rounds.round_seed(training_args.seed, k))
            episodes, kept, t_sample, t_train = [], 0, 0.0, 0.0
            with rounds.failing_as_round(k, training_args):
                if k == 0:
                    policy = rounds.evaluated_model(base, run, 0, init)
                else:
                    policy = rounds.round_model(base, run, k, model_args, init)
                layout = rounds.layout(script_args, policy.meta)
                if k > 0:
                    # 1. sample from the success-prompted model: each process its share of one seeded draw
                    t0 = time.perf_counter()
                    episodes = sample_episodes(policy, task, script_args.episodes_per_round, goal="success",
                                               layout=layout, seed=rounds.round_seed(training_args.seed, k),
                                               rows=rounds.shard(script_args.episodes_per_round, state),
                                               batch_size=script_args.sample_batch_size,
                                               progress=progress and state.is_main_process)
                    if state.num_processes > 1:
                        episodes = gather_object(episodes)
                    # 2. keep the successes, or label every episode with its outcome
                    examples = rounds.training_examples(policy.tokenizer, task, layout, episodes, script_args.mode)
                    if not examples:
                        raise rounds.no_successes(k, len(episodes))
                    kept = len(examples)
                    # 3. fine-tune on them
                    t1 = time.perf_counter()
                    with rounds.tensorboard_dir(training_args, run, k):
                        train_sft(policy.model, policy.tokenizer, examples,
                                  rounds.round_args(training_args, run, k, batch))
                    t_sample, t_train = t1 - t0, time.perf_counter() - t1
                # 4. evaluate exactly against G^(k+1)(p), then write the round (main process)
                if state.is_main_process:
                    t2 = time.perf_counter()
                    evaluation = rounds.evaluate_round(script_args, policy, task, layout, targets[k + 1],
                                                       rounds.round_seed(training_args.seed, k, 1 << 16))
                    line = rounds.metrics_line(k, evaluation, episodes, kept,
                                               (t_sample, t_train, time.perf_counter() - t2))
                    rounds.write_round(run, k, task, layout, policy, episodes, line, evaluation["eval"])
                    print(rounds.summary(line, script_args.rounds), flush=True)
            state.wait_for_everyone()

        if state.is_main_process:
            shutil.rmtree(run.path / "trainer", ignore_errors=True)
            print(f"report: {rounds.write_report(run, script_args, task, config)}", flush=True)
    return run.path


if __name__ == "__main__":
    parser = make_parser(SelfTrainArguments, "self_train", __doc__)
    try:
        main(*parse(parser))
    except LmcohError as err:
        sys.exit(f"self_train: error: {err}")
