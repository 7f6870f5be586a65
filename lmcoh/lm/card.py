"""A model's coherence card: `lmcoh evaluate --reference model` on a set of tasks, distilled.

For each task the card keeps what says whether stating the goal makes the model act as exact
Bayesian conditioning of its own behaviour would
(docs/theory.md, "A language model as a policy"): the success of the goal-prompted policy pi, of the model's own unprompted policy
p_M, of exact G(p_M) and of the optimum, how far pi is from G(p_M) and from p_M, and pi's
incoherence at the state and token level. Every figure is the one `lmcoh.lm.metrics.evaluate`
reports, read off its result, so a card's entry and `evaluate` agree by construction.

A task the model cannot be measured on (its text does not fit the context, the tokenizer has
no chat template, the work does not fit in memory) is one line in the card, not a failure of
the card.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ..errors import LmcohError
from ..oracle import exact
from .metrics import evaluate
from .loading import check_task_fits, model_layout
from .text import Layout

DEFAULT_GOAL_TEXT = "Choose so that you succeed."  # for a model that never learned the goal token

FIGURES = ("success_policy", "success_reference", "success_conditioned", "success_optimal",
           "tv_to_conditioned", "tv_to_reference", "incoherence", "incoherence_finite_part",
           "token_incoherence")


def entry(task, result: dict, seconds: float) -> dict:
    """A card's entry for ``task`` from `metrics.evaluate`'s ``result`` (with ``reference="model"``)."""
    out = {"task": task.name,
           "success_policy": result["success"],
           "success_reference": result["reference_success"],
           "success_conditioned": result["success_of_retrain"][1],
           "success_optimal": exact.optimal_success(task),
           "tv_to_conditioned": result["tv_to_retrain"][1],
           "tv_to_reference": result["tv_to_retrain"][0],
           "incoherence": result["incoherence"],
           "incoherence_finite_part": result["incoherence_finite_part"],
           "token_incoherence": result["token_incoherence"]["total"],
           "histories": result["histories"],
           "exact": result["exact"],
           "seconds": round(seconds, 2)}
    if not result["exact"]:
        out["success_ci"] = result["success_ci"]
    return out


def layout(loaded, format: str | None = None, mode: str | None = None, goal_text: str | None = None) -> Layout:
    """The card's layout: the choices given, else the model's own (`model_layout`), else Markov
    prompts; a model lmcoh did not condition reads the chat format when its tokenizer has a chat
    template (else natural) and the goal in words (`DEFAULT_GOAL_TEXT`)."""
    meta = loaded.meta
    mode = mode or meta.get("prompt_mode") or "markov"
    if not meta.get("task"):
        format = format or ("chat" if getattr(loaded.tokenizer, "chat_template", None) else "natural")
        goal_text = goal_text if goal_text is not None else DEFAULT_GOAL_TEXT
    return model_layout(meta, format, mode, goal_text)


def measure(loaded, tasks: list, layout: Layout, *, report: Callable[[str], None] = lambda line: None,
            **evaluate_kwargs) -> Iterator[dict]:
    """The card's entry for each of ``tasks``, in order: measured, or ``{"task", "error"}``.
    ``evaluate_kwargs`` go to `metrics.evaluate`; ``report`` gets one line per task."""
    for i, task in enumerate(tasks, 1):
        began = time.perf_counter()
        head = f"[{i}/{len(tasks)}] {task.name}"
        try:
            check_task_fits(loaded, task, layout)
            result = evaluate(loaded, task, "success", layout=layout, reference="model", **evaluate_kwargs)
        except LmcohError as err:
            report(f"{head}: not measured: {err}")
            yield {"task": task.name, "error": str(err)}
            continue
        row = entry(task, result, time.perf_counter() - began)
        report(f"{head}: success {row['success_policy']:.3f} prompted, {row['success_reference']:.3f} without the "
               f"goal, {row['success_conditioned']:.3f} by exact conditioning; TV to G(p_M) "
               f"{row['tv_to_conditioned']:.3f} ({row['seconds']:.1f} s)")
        yield row
