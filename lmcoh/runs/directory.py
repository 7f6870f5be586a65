"""A run's output directory: what it holds, how a rerun resumes it.

    config.yaml      every resolved setting (a rerun whose settings differ is refused, but
                     for the run-neutral ones: paths, logging, the number of rounds)
    prior/           the built-in pretrained prior, when no model_name_or_path is given
    rounds/k/        metrics.json, eval.json, episodes.jsonl, model/ (the round's adapter)
    metrics.jsonl    one line per complete round, always rebuilt from rounds/
    report.md, *.png the report

A round is written to ``rounds/.tmp-k`` and renamed to ``rounds/k`` when complete, so a run
killed at any moment leaves complete rounds and at most one partial one, which a rerun
discards.
"""

from __future__ import annotations

import dataclasses
import shutil
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

    # ---- checking and preparing --------------------------------------------------------------
    def check(self, config: dict, overwrite: bool = False) -> None:
        """`RunError` if the directory holds something else, or a run with another config."""
        out = self.path
        if overwrite or not out.exists():
            return
        if not out.is_dir():
            raise RunError(f"output_dir {out} exists and is not a directory")
        saved = out / "config.yaml"
        if not saved.is_file():
            if any(out.iterdir()):
                raise RunError(f"output_dir {out} is not empty and holds no self-training run; "
                               "choose another --output_dir or pass --overwrite")
            return
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise RunError(f"{saved}: damaged (not YAML); pass --overwrite to start over") from None
        for key, value in config.items():
            if not is_run_neutral(key) and old.get(key) != value:
                raise RunError(f"output_dir {out} holds a run with a different config "
                               f"({key}: {old.get(key)!r} there, {value!r} now); "
                               "pass --overwrite to start over or choose another --output_dir")

    def prepare(self, config: dict, overwrite: bool = False, header: str = "") -> int:
        """Create the directory (emptied first with ``overwrite``), discard partial rounds,
        write config.yaml, rebuild metrics.jsonl from rounds/; return the complete rounds."""
        self.check(config, overwrite)
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.rounds.mkdir(parents=True, exist_ok=True)
        for partial in self.rounds.glob(".tmp-*"):
            shutil.rmtree(partial)
        io.write_text(self.path / "config.yaml", header + yaml.safe_dump(config, sort_keys=False))
        return len(self.sync_metrics())

    # ---- rounds ------------------------------------------------------------------------------
    def complete_rounds(self) -> list[dict]:
        """The metrics of rounds 0, 1, ... that are complete, stopping at the first gap."""
        rows = []
        while (self.round_dir(len(rows)) / "metrics.json").is_file():
            path = self.round_dir(len(rows)) / "metrics.json"
            try:
                rows.append(io.read_json(path))
            except LmcohError as err:
                raise RunError(f"{err}; pass --overwrite to start over") from None
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
        io.replace_dir(tmp, self.round_dir(k))
        self.sync_metrics()


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
