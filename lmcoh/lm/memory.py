"""Memory of a language model's work, estimated before it is allocated.

Scoring, tabulation and rollouts run rows of token histories through the model on one KV
cache (lmcoh.lm.scoring.Context). What a row costs follows from the model's config: its KV
cache holds ``layers x 2 x kv_heads x head_dim`` numbers per token; one forward adds the
layer's activations (hidden and MLP widths, attention scores over the row) and the logits
kept (vocabulary x the positions scored; only the action tokens' positions are kept). Each
caller adds up what it holds at its peak for its longest row (`Codec.lengths`) and asks
`fit_rows` how many rows fit beside what the process already holds (its resident memory:
the weights, the libraries) under the limit of lmcoh.tasks.budget. The batch shrinks to fit;
only when not even the smallest unit of work fits (one history) is the work refused, in one
line naming the size and how to raise the limit. On a GPU the free device memory bounds the
rows instead.

Costs are upper estimates, with a slack for what malloc keeps of freed tensors (`ALLOCATOR`),
which `reclaim` hands back where the resident size nears the limit; tests/test_memory.py
measures a peak under the limit the batch was sized for.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from ..errors import BudgetError, ModelError
from ..tasks import budget

FLOAT = 4  # log-probs and attention scores are float32 whatever the model's dtype
HIDDEN_COPIES = 8  # residual, norm, q, attention output, ... of one layer, live at once
PAGE = 4096
# The process holds more than its live tensors: freed KV caches (tens of MB each, their sizes
# changing at every step) stay in malloc's heap, to be reused. Tabulating slippery_grid with
# SmolLM2 without this slack, the resident size ran 4% (3 GB limit) and 12% (8 GB limit) above
# the estimate; after 28 forwards it held 2.44 GB where 0.89 GB (weights, libraries) and
# 0.97 GB of caches were in use, and malloc_trim gave the other 0.58 GB back.
ALLOCATOR = 1.3
RECLAIM_AT = 0.9  # of the limit: where `reclaim` hands the freed heap back
try:
    _TRIM = ctypes.CDLL(None).malloc_trim  # glibc
except (OSError, AttributeError, TypeError):
    _TRIM = None


@dataclass(frozen=True)
class Footprint:
    """The sizes of a causal LM that set what its work costs."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    context: int | None  # the longest row the model can read (its position embeddings)
    device: torch.device

    @classmethod
    def of(cls, model) -> "Footprint":
        """The model's footprint; its weights are paged in first, so that the resident size
        counts them (weights loaded from safetensors are mapped from the file, and read in at
        their first forward)."""
        for weight in model.parameters():
            if weight.device.type == "cpu" and weight.is_contiguous() and weight.numel():
                weight.detach().view(-1)[::max(PAGE // weight.element_size(), 1)].sum()
        config = model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        hidden = config.hidden_size
        first = next(model.parameters())
        return cls(layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads, hidden=hidden,
                   intermediate=(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                 or 4 * hidden),
                   vocab=config.vocab_size, dtype_bytes=first.element_size(),
                   context=getattr(config, "max_position_embeddings", None), device=first.device)

    @property
    def kv_token(self) -> int:
        """Bytes of KV cache per token of one row."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def forward(self, new: int, total: int, kept: int) -> int:
        """Transient bytes of one forward of one row: ``new`` tokens appended to a row that then
        holds ``total``, logits kept at ``kept`` positions."""
        b = self.dtype_bytes
        layer = new * (HIDDEN_COPIES * self.hidden + 3 * self.intermediate) * b
        attention = self.heads * new * total * FLOAT + new * total * FLOAT  # scores and the mask
        if self.kv_heads < self.heads:  # grouped-query attention repeats keys and values per head
            attention += 2 * self.heads * total * self.head_dim * b
        grow = 2 * 2 * self.kv_heads * total * self.head_dim * b  # one layer's cache, old and new
        logits = kept * self.vocab * (b + 2 * FLOAT)  # the logits, in float, and the log-sum-exp
        return layer + attention + grow + logits


def scoring_row(fp: Footprint, prompt: int, actions: int, action: int) -> int:
    """Bytes of one context scored by `lmcoh.lm.scoring.score_contexts`: its prompt's cache, a
    copy per candidate action continued by it, and the larger of the two forwards."""
    cache = fp.kv_token * (prompt + actions * (prompt + action))
    return cache + max(fp.forward(prompt, prompt, 1), actions * fp.forward(action + 1, prompt + action, action + 1))


def tabulation_row(fp: Footprint, prompts: list[int], state: int, action: int) -> int:
    """Bytes of one row of the walk over histories (lmcoh.lm.tabulate): a context of at most the
    batch's rows stays open at every depth (``prompts[t]`` tokens long at depth t), the rows of
    the deepest one are copied once more, and a forward appends an action and a state."""
    longest = prompts[-1] + action
    cache = fp.kv_token * (sum(prompts) + longest)
    return cache + max(fp.forward(prompts[0], prompts[0], 1), fp.forward(action + state, longest, action + 1))


def rollout_row(fp: Footprint, prompts: list[int], state: int, action: int, actions: int) -> int:
    """Bytes of one episode of a batch of rollouts (lmcoh.lm.rollout): its context, a copy per
    candidate action to score them, the chosen branch continued by the next state."""
    longest = max(prompts) + action + state
    cache = fp.kv_token * longest * (2 + actions)
    return cache + max(fp.forward(max(prompts), max(prompts), 1),
                       actions * fp.forward(action + 1, longest, action + 1), fp.forward(state + action, longest, 1))


def resident_bytes() -> int:
    """What the process holds now (resident set size), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def reclaim() -> None:
    """Where the resident size nears the limit, hand the memory malloc keeps from freed tensors
    back to the system (glibc's ``malloc_trim``), so that a long run's heap does not creep past
    it. Called between forwards; costs nothing while memory is plentiful."""
    if _TRIM is not None and resident_bytes() > RECLAIM_AT * budget.limit_bytes():
        _TRIM(0)


def fit_rows(footprint: Footprint, per_row: float, wanted: int, least: int, what: str) -> int:
    """How many rows (at most ``wanted``) of ``per_row`` bytes fit in memory; `BudgetError` when
    fewer than ``least`` (the rows of ``what``, the smallest unit of the work) do."""
    if footprint.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(footprint.device)
        room, where = 0.9 * free, f"the {budget.human(free)} free on {footprint.device}"
    else:
        limit = budget.limit_bytes()
        held = resident_bytes()
        room = limit - held
        where = f"the memory limit of {budget.human(limit)} ({budget.human(held)} already in use)"
    per_row *= ALLOCATOR
    rows = int(max(room, 0) // max(per_row, 1))
    if rows < least:
        raise BudgetError(f"{what} needs about {budget.human(least * per_row)} for the language model's work, "
                          f"over {where}; {budget.HOW_TO_RAISE}")
    return max(least, min(wanted, rows))


def check_context(footprint: Footprint, tokens: int, what: str) -> None:
    """`ModelError` when a row of ``tokens`` is longer than the model can read."""
    if footprint.context is not None and tokens > footprint.context:
        raise ModelError(f"{what} is about {tokens} tokens long, beyond the model's context of "
                         f"{footprint.context} tokens")
