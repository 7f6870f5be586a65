"""The one place that knows how an episode is written as text.

An episode is one string: a header, then for every decision the state's chunk followed by the
action chunk the model writes. A `Layout` says how: its format, its prompt mode and how the
goal is worded. Three formats, shown on the mountain race under the goal ``success``:

* ``compact`` (lmcoh's own; the built-in word-level model reads only this)::

      [start] You stand at the start of the race. <success> up <eoa> [ridge] A narrow ridge. <success> up <eoa>

  With no goal, ``>`` stands where the goal does: ``[start] You stand at the start of the race. > up <eoa>``.

* ``natural`` (plain English, one line per decision)::

      Step 1 (start). You stand at the start of the race. Choices: up, down. <success> You choose: up
      Step 2 (ridge). A narrow ridge. Choices: up, down. <success> You choose: up

* ``chat`` (the tokenizer's own chat template): the system message holds the task's description
  and the goal, each state is a user turn (the step, the state's text, the choices, the goal)
  and each action is the assistant's reply.

The goal is written at every decision, right before the action it conditions (docs/theory.md,
"Goal conditioning and retraining"): like Decision Transformer's return-to-go, which stands
beside every action. Measured on the 1M-parameter stand-ins of lmcoh.lm.standins, a LoRA
adapter learns G(p) in a few hundred steps when the goal token is the last one before the
action, and ignores a goal written a dozen tokens earlier. The goal is the marker token
``<success>`` / ``<failure>`` (no marker: the unconditioned prior); a layout's ``goal_text``
replaces ``<success>`` by a statement in plain words (for models that never learned the token).

Prompt modes: ``history`` shows every earlier decision; ``markov`` only the header and the
current state (with its step), so the policy is Markov.

`Writer` writes a task's chunks in one layout. Chunks concatenate to the whole text; how a
tokenizer splits them is lmcoh.lm.scoring's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import ModelError, first_line
from ..tasks.task import Task

GOALS = ("success", "failure", "none")
GOAL_TOKENS = {"success": "<success>", "failure": "<failure>", "none": ""}
EOA = "<eoa>"
MARKERS = ("<success>", "<failure>", EOA)  # added as special tokens to a pretrained model's tokenizer
SPECIAL_WORDS = (*MARKERS, ">")
FORMATS = ("compact", "natural", "chat")
PROMPT_MODES = ("history", "markov")


def goal_prefix(goal: str) -> str:
    if goal not in GOAL_TOKENS:
        raise ValueError(f"unknown goal {goal!r}; choose one of {', '.join(GOALS)}")
    return GOAL_TOKENS[goal]


@dataclass(frozen=True)
class Layout:
    """How episodes are written: ``format`` (one of `FORMATS`), prompt ``mode`` (one of
    `PROMPT_MODES`) and ``goal_text``, a plain-words statement of the success goal written in
    place of ``<success>`` (None: the token)."""

    format: str = "compact"
    mode: str = "history"
    goal_text: str | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ModelError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.mode not in PROMPT_MODES:
            raise ModelError(f"unknown prompt mode {self.mode!r}; choose one of {', '.join(PROMPT_MODES)}")
        if self.goal_text is not None and (not self.goal_text.strip() or any(c in self.goal_text for c in "<>\n")):
            raise ModelError(f"the goal text must be one line of words without '<' or '>', got {self.goal_text!r}")

    def marker(self, goal: str) -> str:
        """The goal as written before every decision ("" for no goal)."""
        token = goal_prefix(goal)
        return self.goal_text if goal == "success" and self.goal_text else token


class Writer:
    """The text chunks of ``task`` in ``layout``. The chat format renders with ``tokenizer``'s
    chat template (`ModelError` if it has none)."""

    def __init__(self, task: Task, layout: Layout = Layout(), tokenizer=None):
        self.task, self.layout = task, layout
        self._render = None
        if layout.format == "chat":
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ModelError("the chat format needs a tokenizer with a chat template, and this one has none")
            self._render = tokenizer.apply_chat_template
        self._chat_cache: dict = {}

    # ---- the pieces, plain --------------------------------------------------------------------
    def _choices(self, s: int) -> str:
        return ", ".join(self.task.action_names[a] for a in self.task.actions_of(s))

    def _plain_state(self, goal: str, s: int, t: int) -> str:
        """A state in plain words and the goal: natural's line, chat's user turn (without "You choose:")."""
        task, marker = self.task, self.layout.marker(goal)
        text = task.state_texts[s]
        body = f"Step {t + 1} ({task.state_names[s]})." + (f" {text}" if text else "")
        return f"{body} Choices: {self._choices(s)}." + (f" {marker}" if marker else "")

    def _system(self, goal: str) -> list[dict]:
        content = " ".join(x for x in (self.task.description, self.layout.marker(goal)) if x)
        return [{"role": "system", "content": content}] if content else []

    def _chat(self, messages: list[dict], reply: bool) -> str:
        """The rendered conversation; ``reply``: ends with the prompt for the assistant's reply."""
        from jinja2 import TemplateError

        try:
            return self._render(messages, tokenize=False, add_generation_prompt=reply)
        except TemplateError as err:  # a template's own refusal, e.g. Gemma's "System role not supported"
            raise ModelError(f"the chat template refuses lmcoh's conversation ({first_line(err)}); "
                             "use --format compact or natural") from None

    def _added(self, before: list[dict], before_reply: bool, after: list[dict], after_reply: bool) -> str:
        """The text that rendering ``after`` adds to rendering ``before`` (which must be a prefix of it)."""
        key = (repr(before), before_reply, repr(after), after_reply)
        if key not in self._chat_cache:
            head = self._chat(before, before_reply) if before else ""
            whole = self._chat(after, after_reply)
            if not whole.startswith(head):
                raise ModelError("the chat template does not render a conversation turn by turn (an earlier "
                                 "render is not a prefix of a later one)")
            self._chat_cache[key] = whole[len(head):]
        return self._chat_cache[key]

    def _user(self, goal: str, s: int, t: int) -> dict:
        return {"role": "user", "content": self._plain_state(goal, s, t)}

    def _assistant(self, a: int) -> dict:
        return {"role": "assistant", "content": self.task.action_names[a]}

    # ---- chunks ----------------------------------------------------------------------------------
    def header(self, goal: str) -> str:
        """The text before the first state: the chat format's system turn, else nothing."""
        if self.layout.format == "chat":
            system = self._system(goal)
            return self._added([], False, system, False) if system else ""
        return ""

    def state(self, goal: str, s: int, t: int) -> str:
        """The chunk of state ``s`` at decision step ``t`` (0-based), up to where the action begins."""
        fmt, task, marker = self.layout.format, self.task, self.layout.marker(goal)
        first = t == 0 or self.layout.mode == "markov"
        if fmt == "compact":
            text = task.state_texts[s]
            step = f"@{t} " if self.layout.mode == "markov" else ""
            body = f"{step}[{task.state_names[s]}]" + (f" {text}" if text else "")
            return ("" if first else " ") + f"{body} {marker or '>'}"
        if fmt == "natural":
            return self._plain_state(goal, s, t) + " You choose:"
        system = self._system(goal)
        if first:
            return self._added(system, False, system + [self._user(goal, s, t)], True)
        # after an earlier turn: a representative one (the same state and its first action)
        earlier = system + [self._user(goal, s, t - 1), self._assistant(task.action_ptr[s])]
        return self._added(earlier, False, earlier + [self._user(goal, s, t)], True)

    def action(self, a: int) -> str:
        """The chunk the model writes for flat action ``a``: its name and the end of the action."""
        fmt, name = self.layout.format, self.task.action_names[a]
        if fmt == "compact":
            return f" {name} {EOA}"
        if fmt == "natural":
            return f" {name}\n"
        asked = [self._user("none", int(self.task.action_state[a]), 0)]
        return self._added(asked, True, asked + [self._assistant(a)], False)

    # ---- whole texts -------------------------------------------------------------------------------
    def prompt(self, goal: str, states: Sequence[int], actions: Sequence[int]) -> str:
        """The text the model reads before choosing an action in ``states[-1]``.

        ``actions`` are the flat action ids taken in ``states[:-1]`` (one fewer than states).
        """
        t = len(states) - 1
        if self.layout.mode == "markov":
            if self.layout.format == "chat":
                return self._chat(self._system(goal) + [self._user(goal, states[-1], t)], reply=True)
            return self.header(goal) + self.state(goal, states[-1], t)
        if self.layout.format == "chat":
            return self._chat(self._conversation(goal, states, actions), reply=True)
        return self.header(goal) + "".join(self.state(goal, s, i) + (self.action(actions[i]) if i < t else "")
                                           for i, s in enumerate(states))

    def answered(self, goal: str, states: Sequence[int], actions: Sequence[int], a: int) -> str:
        """`prompt` followed by action ``a``'s chunk (for chat: the conversation with the reply, rendered)."""
        if self.layout.format != "chat":
            return self.prompt(goal, states, actions) + self.action(a)
        t = len(states) - 1
        messages = (self._system(goal) + [self._user(goal, states[-1], t)] if self.layout.mode == "markov"
                    else self._conversation(goal, states, actions))
        return self._chat(messages + [self._assistant(a)], reply=False)

    def episode(self, goal: str, states: Sequence[int], actions: Sequence[int]) -> str:
        """A full transcript (history mode): every visited decision state and the action taken."""
        steps = min(len(states), len(actions))
        if self.layout.format == "chat":
            return self._chat(self._conversation(goal, states[:steps], actions[:steps]), reply=False)
        return self.header(goal) + "".join(self.state(goal, states[i], i) + self.action(actions[i])
                                           for i in range(steps))

    def _conversation(self, goal: str, states: Sequence[int], actions: Sequence[int]) -> list[dict]:
        messages = self._system(goal)
        for i, s in enumerate(states):
            messages.append(self._user(goal, s, i))
            if i < len(actions):
                messages.append(self._assistant(actions[i]))
        return messages


def episode_record(writer: Writer, episode) -> dict:
    """An episode as one JSON line: its transcript, then `Episode.to_json`'s fields."""
    return {"text": writer.episode(episode.goal, episode.states, episode.actions), **episode.to_json(writer.task)}
