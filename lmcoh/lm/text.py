"""The one place that knows how an episode is written as text.

An episode is one sequence: the outcome (goal) token, then for every decision the state's
chunk followed by the action chunk the model writes::

    <success> [start] You stand at the start of the race. > up <eoa> [ridge] A narrow ridge. > up <eoa>

* goal token: ``<success>`` (O = 1), ``<failure>`` (O = 0), or nothing (unconditioned prior);
* state chunk: `` [NAME] TEXT >`` (history prompts) or `` @t [NAME] TEXT >`` (markov prompts,
  where the model sees only the current state and step);
* action chunk: `` ACTION <eoa>`` - the action name as free text plus the end-of-action marker.

Every chunk starts with a space, so a transcript is the plain concatenation of its chunks and
tokenising a prefix and a continuation separately matches tokenising the whole text.
"""

from __future__ import annotations

from typing import Sequence

from ..tasks.task import Task

GOALS = ("success", "failure", "none")
GOAL_TOKENS = {"success": "<success>", "failure": "<failure>", "none": ""}
EOA = "<eoa>"
PROMPT_MODES = ("history", "markov")
SPECIAL_WORDS = ("<success>", "<failure>", EOA, ">")


def goal_prefix(goal: str) -> str:
    if goal not in GOAL_TOKENS:
        raise ValueError(f"unknown goal {goal!r}; choose one of {', '.join(GOALS)}")
    return GOAL_TOKENS[goal]


def state_chunk(task: Task, state: int, step: int, mode: str = "history") -> str:
    text = task.state_texts[state]
    body = f"[{task.state_names[state]}] {text}".rstrip() if text else f"[{task.state_names[state]}]"
    if mode == "markov":
        return f" @{step} {body} >"
    return f" {body} >"


def action_chunk(action_name: str) -> str:
    return f" {action_name} {EOA}"


def prompt(task: Task, goal: str, states: Sequence[int], actions: Sequence[int],
           mode: str = "history") -> str:
    """The text the model reads before choosing an action in ``states[-1]``.

    ``actions`` are the flat action ids taken in ``states[:-1]`` (one fewer than states).
    """
    t = len(states) - 1
    if mode == "markov":
        return goal_prefix(goal) + state_chunk(task, states[-1], t, mode)
    parts = [goal_prefix(goal)]
    for step, s in enumerate(states):
        parts.append(state_chunk(task, s, step, mode))
        if step < len(actions):
            parts.append(action_chunk(task.action_names[actions[step]]))
    return "".join(parts)


def episode_text(task: Task, goal: str, states: Sequence[int], actions: Sequence[int]) -> str:
    """A full transcript (history mode): every visited decision state and the action taken."""
    parts = [goal_prefix(goal)]
    for step, (s, a) in enumerate(zip(states, actions)):
        parts.append(state_chunk(task, s, step))
        parts.append(action_chunk(task.action_names[a]))
    return "".join(parts)


def episode_record(task: Task, episode) -> dict:
    """An episode as one JSON line: its transcript, then `Episode.to_json`'s fields."""
    return {"text": episode_text(task, episode.goal, episode.states, episode.actions), **episode.to_json(task)}
