"""Task files: read a task YAML strictly into a `Task`, and write a `Task` back as YAML.

The format (``yaml.safe_load`` semantics; every key but ``horizon``, ``start`` and ``states`` optional)::

    name: mountain_race          # default: the file name
    description: One line.
    horizon: 2                   # decisions per episode, an int >= 1
    start: start                 # a state, or {state: prob}
    prior: uniform               # or {state: {action: prob}}; states left out are uniform
    timeout_success: 0.0         # (or timeout_reward: log q) for running out of decisions
    states:
      start:
        text: You stand at the start of the race.
        actions:
          up: {next: ridge}                      # next: a state or terminal, or {name: prob}
          down: {next: forest, success: 1.0}     # success: q in [0, 1] (default 1), or reward: log q <= 0
    terminals:
      gold: {success: 1.0, text: Gold!}          # success or reward; absent -> 1

Every problem is a `TaskError` whose message is one line naming the file, the place in it
(``states.ridge.actions.up``) and what is wrong.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path

import yaml

from .task import Task, TaskError

TOP_KEYS = ("name", "description", "horizon", "start", "prior", "timeout_success",
            "timeout_reward", "states", "terminals")
STATE_KEYS = ("text", "actions")
ACTION_KEYS = ("next", "success", "reward")
TERMINAL_KEYS = ("text", "success", "reward")
TOLERANCE = 1e-9

# Characters the episode text format gives a meaning to (see lmcoh/text.py).
_STATE_NAME_BAD = re.compile(r"[\s\[\]<>@]")
_ACTION_NAME_BAD = re.compile(r"[\[\]<>\n\r\t]")
_TEXT_BAD = re.compile(r"[<>\n\r]")


class _Loader(yaml.SafeLoader):
    """The safe loader, made stricter (duplicate keys are errors) and friendlier (``1e-3`` is a float)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789"))


# ---- reading -------------------------------------------------------------------------------

def load(path: str | Path) -> Task:
    """Read and validate a task file; raises `TaskError` with a one-line message."""
    path = Path(path)
    spec = parse(read_text(path), str(path), default_name=path.stem)
    return Task.from_spec(spec, source=str(path))


def read_text(path: Path) -> str:
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if path.is_dir():
        raise TaskError(f"{path}: is a directory, not a task file")
    data = path.read_bytes()
    if b"\0" in data:
        raise TaskError(f"{path}: binary file, not a YAML task")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}: not UTF-8 text (byte {err.start})") from None


def parse(text: str, where: str, default_name: str = "task") -> dict:
    """YAML text -> the normalised spec dict that `Task.from_spec` takes."""
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise TaskError(f"{where}: {_yaml_message(err)}") from None
    if doc is None:
        raise TaskError(f"{where}: file is empty")
    return _Checker(where).task(doc, default_name)


def _yaml_message(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _one_line(f"{place}YAML syntax error: {problem}")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Checker:
    """Walks the parsed YAML, raising `TaskError` at the first problem with its location."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, place: str, problem: str) -> None:
        prefix = f"{self.where}: {place}: " if place else f"{self.where}: "
        raise TaskError(_one_line(prefix + problem, limit=400))

    # -- generic shapes --
    def mapping(self, value, place: str, what: str = "a mapping") -> dict:
        if not isinstance(value, dict):
            self.fail(place, f"expected {what}, got {_describe(value)}")
        return value

    def keys(self, value: dict, place: str, allowed: tuple, required: tuple = ()) -> None:
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
                self.fail(place, f"unknown key {key!r}{tip}")
        for key in required:
            if key not in value:
                self.fail(place, f"missing key {key!r}")

    def number(self, value, place: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(place, f"expected a number, got {_describe(value)}")
        if math.isnan(value):
            self.fail(place, "expected a number, got NaN")
        return float(value)

    def probability(self, value, place: str) -> float:
        p = self.number(value, place)
        if not 0.0 <= p <= 1.0:
            self.fail(place, f"probability must be in [0, 1], got {value!r}")
        return p

    def text(self, value, place: str) -> str:
        if not isinstance(value, str):
            self.fail(place, f"expected a string, got {_describe(value)}")
        if _TEXT_BAD.search(value):
            self.fail(place, "text must be one line without '<' or '>'")
        return value.strip()

    def logq(self, value: dict, place: str, keys: tuple = ("success", "reward"),
             default: float = 0.0) -> float:
        """log q from ``success: q`` in [0, 1] or ``reward: log q`` <= 0 (at most one of them)."""
        success, reward = keys
        if success in value and reward in value:
            self.fail(place or "top level", f"give either {success!r} or {reward!r}, not both")
        if reward in value:
            r = self.number(value[reward], _at(place, reward))
            if r > 0:
                self.fail(_at(place, reward), f"reward is log q and must be <= 0, got {value[reward]!r}")
            return r
        if success in value:
            q = self.number(value[success], _at(place, success))
            if not 0.0 <= q <= 1.0:
                self.fail(_at(place, success), f"success must be in [0, 1], got {value[success]!r}")
            return math.log(q) if q > 0 else -math.inf
        return default

    def distribution(self, value, place: str, names: set, what: str) -> dict:
        """A name, or {name: prob} summing to 1, over ``names``."""
        if isinstance(value, str):
            value = {value: 1.0}
        elif not isinstance(value, dict) or not value:
            self.fail(place, f"expected a {what} name or a non-empty {{{what}: probability}} mapping, "
                             f"got {_describe(value)}")
        out = {}
        for name, p in value.items():
            if not isinstance(name, str) or name not in names:
                self.fail(place, f"unknown {what} {name!r}{_suggest(name, names)}")
            out[name] = self.probability(p, f"{place}.{name}")
        self.sums_to_one(out, place)
        return out

    def sums_to_one(self, probs: dict, place: str) -> None:
        total = math.fsum(probs.values())
        if abs(total - 1.0) > TOLERANCE:
            self.fail(place, f"probabilities sum to {total:.12g}, not 1")

    # -- the task --
    def task(self, doc, default_name: str) -> dict:
        doc = self.mapping(doc, "", "a mapping of task keys at the top level")
        self.keys(doc, "top level", TOP_KEYS, required=("horizon", "start", "states"))
        name = doc.get("name", default_name)
        if not isinstance(name, str) or not name.strip() or "\n" in name:
            self.fail("name", f"expected a one-line string, got {_describe(name)}")
        description = self.text(doc.get("description", ""), "description")
        horizon = doc["horizon"]
        if isinstance(horizon, bool) or not isinstance(horizon, int):
            self.fail("horizon", f"expected an integer >= 1, got {_describe(horizon)}")
        if horizon < 1:
            self.fail("horizon", f"must be >= 1, got {horizon}")

        states_doc = self.mapping(doc["states"], "states", "a mapping of state names")
        if not states_doc:
            self.fail("states", "no states given")
        terminals_doc = doc.get("terminals") or {}
        terminals_doc = self.mapping(terminals_doc, "terminals", "a mapping of terminal names")
        for tname in terminals_doc:
            self.name(tname, "terminals")
            if tname in states_doc:
                self.fail(f"terminals.{tname}", "name used both as a state and a terminal")
        for sname in states_doc:
            self.name(sname, "states")
        everything = set(states_doc) | set(terminals_doc)

        states = {s: self.state(s, body, everything) for s, body in states_doc.items()}
        terminals = {t: self.terminal(t, body) for t, body in terminals_doc.items()}
        start = doc["start"]
        for tname in terminals_doc:
            if tname == start or (isinstance(start, dict) and tname in start):
                self.fail("start", f"{tname!r} is a terminal; episodes must start in a state with actions")
        start = self.distribution(start, "start", set(states_doc), "state")
        self.prior(doc.get("prior", "uniform"), states)
        timeout_logq = self.logq(doc, "", ("timeout_success", "timeout_reward"), default=-math.inf)
        return {"name": name, "description": description, "horizon": horizon,
                "timeout_logq": timeout_logq, "start": start, "states": states,
                "terminals": terminals}

    def name(self, name, place: str) -> None:
        """A state or terminal name: one word, free of the characters the text format uses."""
        if not isinstance(name, str) or not name:
            hint = " (quote it in the YAML)" if isinstance(name, (bool, int, float)) else ""
            self.fail(place, f"name must be a non-empty string, got {_describe(name)}{hint}")
        if _STATE_NAME_BAD.search(name):
            self.fail(f"{place}.{name}", "state and terminal names may not contain spaces or any of [ ] < > @")

    def state(self, sname: str, body, everything: set) -> dict:
        place = f"states.{sname}"
        body = self.mapping(body, place, "a mapping with 'actions' (and optional 'text')")
        self.keys(body, place, STATE_KEYS, required=("actions",))
        actions_doc = body["actions"]
        if actions_doc is None or actions_doc == {}:
            self.fail(f"{place}.actions", "a state needs at least one action (use 'terminals' for end states)")
        actions_doc = self.mapping(actions_doc, f"{place}.actions", "a mapping of action names")
        actions = {}
        for aname, act in actions_doc.items():
            aplace = f"{place}.actions.{aname}"
            self.action_name(aname, aplace)
            act = self.mapping(act, aplace, "a mapping with 'next' (and optional 'success' or 'reward')")
            self.keys(act, aplace, ACTION_KEYS, required=("next",))
            actions[aname] = {"next": self.distribution(act["next"], f"{aplace}.next", everything, "state"),
                              "logq": self.logq(act, aplace), "prior": 1.0 / len(actions_doc)}
        return {"text": self.text(body.get("text", ""), f"{place}.text"), "actions": actions}

    def action_name(self, name, place: str) -> None:
        if not isinstance(name, str) or not name.strip():
            hint = " (quote it in the YAML)" if isinstance(name, (bool, int, float)) else ""
            self.fail(place, f"action name must be a non-empty string, got {_describe(name)}{hint}")
        if name != name.strip() or "  " in name or _ACTION_NAME_BAD.search(name):
            self.fail(place, "action names are single-spaced text without [ ] < > or line breaks")

    def terminal(self, tname: str, body) -> dict:
        place = f"terminals.{tname}"
        body = self.mapping({} if body is None else body, place, "a mapping with 'success' or 'reward'")
        self.keys(body, place, TERMINAL_KEYS)
        return {"text": self.text(body.get("text", ""), f"{place}.text"), "logq": self.logq(body, place)}

    def prior(self, prior, states: dict) -> None:
        """Overwrite the uniform priors in ``states`` with the ones the file gives."""
        if prior == "uniform":
            return
        prior = self.mapping(prior, "prior", "'uniform' or a {state: {action: probability}} mapping")
        for sname, probs in prior.items():
            place = f"prior.{sname}"
            if sname not in states:
                self.fail(place, f"unknown state {sname!r}{_suggest(sname, states)}")
            probs = self.mapping(probs, place, "a {action: probability} mapping")
            actions = states[sname]["actions"]
            for aname in probs:
                if aname not in actions:
                    self.fail(place, f"unknown action {aname!r}{_suggest(aname, actions)}")
            checked = {a: self.probability(p, f"{place}.{a}") for a, p in probs.items()}
            self.sums_to_one(checked, place)
            for aname, act in actions.items():
                act["prior"] = checked.get(aname, 0.0)


def _at(place: str, key: str) -> str:
    return f"{place}.{key}" if place else key


def _describe(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return f"{type(value).__name__} {_one_line(repr(value), 60)}"


def _suggest(name, options) -> str:
    hint = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


# ---- writing -------------------------------------------------------------------------------

def dump(task: Task) -> str:
    """The task as YAML text that `parse` reads back to an equal task."""
    spec = task.to_spec()
    doc = {"name": spec["name"]}
    if spec["description"]:
        doc["description"] = spec["description"]
    doc["horizon"] = spec["horizon"]
    doc["start"] = _compact(spec["start"])
    priors, uniform = {}, True
    for sname, st in spec["states"].items():
        acts = st["actions"]
        probs = {a: act["prior"] for a, act in acts.items()}
        priors[sname] = probs
        uniform &= all(p == 1.0 / len(acts) for p in probs.values())
    doc["prior"] = "uniform" if uniform else {
        s: p for s, p in priors.items() if any(v != 1.0 / len(p) for v in p.values())}
    timeout = _success_or_reward(spec["timeout_logq"])
    if spec["timeout_logq"] != -math.inf:
        doc.update({f"timeout_{k}": v for k, v in timeout.items()})
    doc["states"] = {
        sname: {**({"text": st["text"]} if st["text"] else {}),
                "actions": {a: {"next": _compact(act["next"]), **_success_or_reward(act["logq"])}
                            for a, act in st["actions"].items()}}
        for sname, st in spec["states"].items()}
    doc["terminals"] = {
        tname: {**({"text": t["text"]} if t["text"] else {}), **_success_or_reward(t["logq"])}
        for tname, t in spec["terminals"].items()}
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None)


def _compact(dist: dict):
    return next(iter(dist)) if len(dist) == 1 and next(iter(dist.values())) == 1.0 else dict(dist)


def _success_or_reward(logq: float) -> dict:
    """``success: q`` when it reads back to exactly ``logq``, else ``reward: logq``; {} for q = 1."""
    if logq == 0.0:
        return {}
    if logq == -math.inf:
        return {"success": 0.0}
    q = math.exp(logq)
    return {"success": q} if math.log(q) == logq else {"reward": float(logq)}
