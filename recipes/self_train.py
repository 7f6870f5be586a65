"""Iterated self-training of a goal-conditioned LM policy (issue 5; THEORY.md, "Re-training").

    accelerate launch recipes/self_train.py --config recipes/configs/mountain_race.yaml
    python recipes/self_train.py --config recipes/configs/lottery.yaml --rounds 2 --mode label

Every field of `lmcoh.selftrain.SelfTrainConfig` is a flag (`--help` lists them); a YAML
file given with `--config` sets defaults that flags override. The loop itself is
`lmcoh.selftrain.main`: sample from the success-prompted model, keep the successes (or label
every episode with its outcome), fine-tune the LoRA adapter, evaluate exactly, repeat.
"""

import sys

from trl import TrlParser

from lmcoh.model import ModelError
from lmcoh.selftrain import SelfTrainConfig, SelfTrainError, main
from lmcoh.task import TaskError

if __name__ == "__main__":
    try:
        (cfg,) = TrlParser((SelfTrainConfig,)).parse_args_and_config()
        main(cfg)
    except (SelfTrainError, TaskError, ModelError, ValueError) as err:
        sys.exit(f"self_train: error: {' '.join(str(err).split())}")
