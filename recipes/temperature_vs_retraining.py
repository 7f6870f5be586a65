"""Temperature versus retraining (issue 6; THEORY.md, "Three ways to apply optimisation pressure").

    accelerate launch recipes/temperature_vs_retraining.py --config recipes/configs/temperature_vs_retraining.yaml
    python recipes/temperature_vs_retraining.py --task mountain_race --selftrain_dir outputs/self_train/mountain_race

Every field of `lmcoh.temperature.TemperatureConfig` is a flag (`--help` lists them; the
self-training ones apply when no --selftrain_dir is given); a YAML file given with `--config`
sets defaults that flags override. `lmcoh.temperature.run` self-trains (or reuses a run),
samples the prior LM with rejection at alpha = k, and writes comparison.json, report.md and plots.
"""

import sys

from trl import TrlParser

from lmcoh.model import ModelError
from lmcoh.task import TaskError
from lmcoh.temperature import TemperatureConfig, run

if __name__ == "__main__":
    try:
        (cfg,) = TrlParser((TemperatureConfig,)).parse_args_and_config()
        out = run(cfg)
    except (TaskError, ModelError, ValueError) as err:
        sys.exit(f"temperature_vs_retraining: error: {' '.join(str(err).split())}")
    print(f"report: {out / 'report.md'}")
