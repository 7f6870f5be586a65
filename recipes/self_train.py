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

from pathlib import Path

from lmcoh.runs.arguments import SelfTrainArguments, make_parser, run_recipe
from lmcoh.runs.selftrain import SelfTraining


def main(script_args: SelfTrainArguments, training_args, model_args) -> Path:
    """Run (or resume) self-training into ``training_args.output_dir`` and return it."""
    run = SelfTraining(script_args, training_args, model_args)  # every input checked before any work
    with run.opened() as done:                          # locked; `done` rounds are complete already
        run.pretrain_prior()                            # p: lmcoh's built-in prior, when no model is given
        if done == 0:
            with run.round(0):
                run.evaluate(run.model(0))              # round 0: the prior prompted with <success>, ~ G(p)
        for k in range(max(done, 1), script_args.rounds + 1):
            with run.round(k):                          # reseeded from (seed, k); a failure names round k
                model = run.model(k)                    # round k-1's model, loaded to train
                episodes = run.sample(model)            # 1. sample episodes from the success-prompted model
                examples = run.keep(model, episodes)    # 2. keep the successes, or label each by its outcome
                run.train(model, examples)              # 3. fine-tune on them with TRL's SFTTrainer
                run.evaluate(model)                     # 4. evaluate exactly against G^(k+1)(p); write round k
        run.finish()                                    # report.md and its plots
    return run.path


if __name__ == "__main__":
    run_recipe("self_train", main, make_parser(SelfTrainArguments, "self_train", __doc__))
