"""A run's output directory: what it holds, who may write it, how a rerun resumes it.

    config.yaml      every resolved setting (a rerun whose settings differ is refused, but
                     for the run-neutral ones: paths, logging, the number of rounds)
    prior/           the built-in pretrained prior, when no model_name_or_path is given
    rounds/k/        metrics.json, eval.json, episodes.jsonl, model/ (the round's adapter)
    metrics.jsonl    one line per complete round, always rebuilt from rounds/
    report.md, *.png the report
    tensorboard/     with report_to tensorboard: metrics/ (the run's, a step per round), round_K/

What a run guarantees:

* One run per directory: the main process holds the directory's lock (lmcoh.io.exclusive)
  from before its first write to its exit; a second run fails at once naming the first's pid.
* Killed at any moment, a run resumes to the same numbers: a round is written to
  ``rounds/.tmp-k`` and renamed to ``rounds/k`` when complete, metrics.jsonl is rebuilt from
  the complete rounds, the prior is saved atomically, and every round reseeds from
  (seed, round) and reloads its model from disk.
* Damaged files are found before they are trusted: resuming checks every complete round
  (its JSON parses, its model loads); a damaged round is redone, from that round on, with a
  one-line notice naming the file.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path

import yaml

from .. import io
from ..errors import LmcohError, RunError
from .arguments import is_run_neutral


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rounds = self.path / "rounds"

    def round_dir(self, k: int) -> Path:
        return self.rounds / str(k)

    # ---- opening ------------------------------------------------------------------------------
    @contextmanager
    def opened(self, state, config: dict, overwrite: bool = False, header: str = ""):
        """Lock, check and prepare the directory on the main process only; its verdict, a
        refusal included, reaches every process (so all exit with the same line). Yields the
        number of complete rounds; the lock is held until the block ends."""
        with locked(state, self.path):
            yield on_main(state, lambda: self.prepare(config, overwrite, header))

    def check(self, config: dict, overwrite: bool = False) -> None:
        """`RunError` if the directory holds something else (``overwrite`` replaces only an earlier
        run), or, without ``overwrite``, a run with another config."""
        out = self.path
        if not out.exists():
            return
        if not out.is_dir():
            raise RunError(f"output_dir {out} exists and is not a directory")
        saved = out / "config.yaml"
        if not saved.is_file() and not self.rounds.is_dir():
            if any(out.iterdir()):
                raise RunError(f"output_dir {out} is not empty and holds no self-training run; choose another "
                               "--output_dir (--overwrite replaces only an earlier run)")
            return
        if overwrite or not saved.is_file():
            return
        try:
            old = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            old = None
        if not isinstance(old, dict):
            raise RunError(f"{saved} is damaged (not a YAML mapping); pass --overwrite to start over")
        for key, value in config.items():
            if not is_run_neutral(key, config) and old.get(key) != value:
                raise RunError(f"output_dir {out} holds a run with a different config "
                               f"({key}: {old.get(key)!r} there, {value!r} now); "
                               "pass --overwrite to start over or choose another --output_dir")

    def prepare(self, config: dict, overwrite: bool = False, header: str = "") -> int:
        """Create the directory (emptied first with ``overwrite``), discard partial and damaged
        rounds, write config.yaml, rebuild metrics.jsonl; return the number of complete rounds."""
        self.check(config, overwrite)
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.rounds.mkdir(parents=True, exist_ok=True)
        for partial in [*self.rounds.glob(".tmp-*"), self.path / "trainer"]:
            shutil.rmtree(partial, ignore_errors=True)
        io.write_text(self.path / "config.yaml", header + yaml.safe_dump(config, sort_keys=False))
        rows = self.complete_rounds()
        damaged = _damage(self.round_dir(len(rows)))
        if damaged:
            later = sorted(int(d.name) for d in self.rounds.iterdir() if d.name.isdigit() and int(d.name) >= len(rows))
            print(f"notice: {damaged}; redoing rounds {len(rows)}..{later[-1]} from round {len(rows)}",
                  file=sys.stderr, flush=True)
            for k in later:
                shutil.rmtree(self.round_dir(k))
        self.sync_metrics()
        return len(rows)

    # ---- rounds ------------------------------------------------------------------------------
    def complete_rounds(self) -> list[dict]:
        """The metrics of rounds 0, 1, ... that are complete and sound, up to the first gap."""
        rows = []
        while self.round_dir(len(rows)).is_dir() and not _damage(self.round_dir(len(rows))):
            rows.append(io.read_json(self.round_dir(len(rows)) / "metrics.json"))
        return rows

    def sync_metrics(self) -> list[dict]:
        """Rewrite metrics.jsonl from the complete rounds; return their rows."""
        rows = self.complete_rounds()
        io.write_jsonl(self.path / "metrics.jsonl", rows)
        return rows

    def begin_round(self, k: int) -> Path:
        """A fresh ``rounds/.tmp-k`` to write round k into."""
        tmp = self.rounds / f".tmp-{k}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_round(self, k: int, tmp: Path) -> None:
        """Rename the finished ``rounds/.tmp-k`` to ``rounds/k``, then rebuild metrics.jsonl."""
        from .. import faults

        io.replace_dir(tmp, self.round_dir(k))
        faults.point("commit_round")
        self.sync_metrics()


def on_main(state, fn):
    """``fn()`` on the main process only; its result, or its one-line refusal, is shared with
    every process (a refusal is raised on all of them as a `RunError`)."""
    from accelerate.utils import broadcast_object_list

    result = [None, None]
    if state.is_main_process:
        try:
            result[0] = fn()
        except LmcohError as err:
            result[1] = str(err)
    if state.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    if result[1] is not None:
        raise RunError(result[1])
    return result[0]


@contextmanager
def locked(state, path: str | Path, what: str = "run"):
    """Directory ``path``'s lock (lmcoh.io.exclusive), held by the main process while the
    block runs; a refusal reaches every process."""
    with ExitStack() as held:
        on_main(state, lambda: held.enter_context(io.exclusive(path, what)))
        yield


def _damage(round_dir: Path) -> str | None:
    """What is wrong with a round directory that should be complete (None if it is sound)."""
    if not round_dir.is_dir():
        return None
    k = int(round_dir.name)
    for name in ("metrics.json", "eval.json"):
        try:
            value = io.read_json(round_dir / name)
        except LmcohError as err:
            return str(err)
        if name == "metrics.json" and (not isinstance(value, dict) or value.get("round") != k):
            return f"{round_dir / name}: damaged (not round {k}'s metrics)"
    if k > 0:
        from ..lm.loading import check_saved_model

        try:
            check_saved_model(round_dir / "model")
        except LmcohError as err:
            return str(err)
    return None


def resolved_config(*args) -> dict:
    """Every field of the argument dataclasses as plain YAML values, in one flat mapping
    (the secret ``hub_token`` left out). `--config` reads it back."""
    out = {}
    for obj in args:
        for f in dataclasses.fields(obj):
            if f.init and f.name != "hub_token":
                out[f.name] = _plain(getattr(obj, f.name))
    return io.jsonable(out)


def _plain(value):
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    return value
