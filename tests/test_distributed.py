"""Data parallelism on CPU processes (torchrun, gloo): the same run whatever the number of
processes, and a refused start that every process reports in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmcoh.errors import RunError

from conftest import ROOT, recipe, recipe_args, recipe_env
from lmcoh.lm.configs import per_device_batch
from lmcoh.runs.selftrain import shard, shard_sizes

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


class _State:
    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world


def test_shards_are_contiguous_and_cover_the_table():
    assert [shard(10, _State(r, 3)) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert sum(shard_sizes(2001, 4)) == 2001


def test_the_global_batch_splits_over_processes_and_accumulation():
    assert [per_device_batch(64, w, 2) for w in (1, 2, 4)] == [32, 16, 8]
    _, sft, _ = recipe_args("--global_batch_size", 64, "--gradient_accumulation_steps", 2)
    assert sft.per_device_train_batch_size == 32  # derived in __post_init__ (one process here)
    _, sft, _ = recipe_args("--global_batch_size", 0, "--per_device_train_batch_size", 24)
    assert sft.per_device_train_batch_size == 24  # 0: the Trainer's own per-device batch
    with pytest.raises(RunError, match="global_batch_size 63 does not split evenly over 2 process"):
        per_device_batch(63, 2)


def test_sampling_shards_draw_the_episodes_of_one_process(mountain):
    from conftest import tiny_llama
    from lmcoh.lm.rollout import sample_episodes

    lm = tiny_llama(mountain, seed=5)
    whole = sample_episodes(lm, mountain, 50, seed=3, progress=False)
    parts = [sample_episodes(lm, mountain, 50, seed=3, progress=False, rows=shard(50, _State(r, 2)))
             for r in range(2)]
    key = [(e.states, e.actions, e.success) for e in whole]
    assert key == [(e.states, e.actions, e.success) for part in parts for e in part]


def _torchrun(argv: list, log_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--log-dir", str(log_dir), "--redirects", "3",
                           str(ROOT / "recipes" / "self_train.py"), *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT, env=recipe_env())


def _rank_logs(log_dir: Path, name: str) -> list[str]:
    return [p.read_text() for p in sorted(log_dir.rglob(name)) if p.parent.name.isdigit()]


@pytest.mark.slow
def test_a_refused_start_is_one_line_on_every_process(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = _torchrun(["--task", "mountain_race", "--output_dir", out], tmp_path / "logs")
    assert run.returncode != 0
    errors = _rank_logs(tmp_path / "logs", "stderr.log")
    assert len(errors) == 2
    for text in errors:
        lines = [x for x in text.strip().splitlines() if not x.startswith("[W")]  # torch's own warnings
        assert lines == [f"self_train: error: output_dir {out} is not empty and holds no self-training run; "
                         "choose another --output_dir (--overwrite replaces only an earlier run)"], text
    assert "Connection closed by peer" not in run.stderr and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_curve(tmp_path, mountain_prior):
    argv = ["--config", ROOT / "recipes" / "configs" / "mountain_race.yaml", "--model_name_or_path", mountain_prior,
            "--rounds", 2, "--episodes_per_round", 1000, "--disable_tqdm", "true"]
    one = recipe("self_train").main(*recipe_args(*argv, "--output_dir", tmp_path / "one"))
    rows_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    for start in range(3):  # fresh directories: the start-up must never race
        out = tmp_path / f"two{start}"
        run = _torchrun([*argv, "--output_dir", out], tmp_path / f"logs{start}")
        assert run.returncode == 0, "\n".join(_rank_logs(tmp_path / f"logs{start}", "stderr.log"))[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        # round 1 samples the same prior: the very same episodes. Later rounds sample a model whose
        # DDP-averaged gradients differ from one process's by float rounding, which flips a rare draw.
        assert rows[1]["episodes_kept"] == rows_one[1]["episodes_kept"]
        for a, b in zip(rows_one, rows):
            assert abs(b["episodes_kept"] - a["episodes_kept"]) <= 0.01 * a["episodes_sampled"]
            assert abs(b["success"] - a["success"]) <= 0.02, (a, b)
