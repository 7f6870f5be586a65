"""Exact action scoring: a language model's probability of each legal action, batched.

The model reads a prompt (lmcoh.lm.text) and writes an action chunk `` ACTION <eoa>``. Its
probability of legal action ``a`` in context ``h`` is

    pi(a | h) = exp(log p(chunk(a) | h)) / sum over legal a' of exp(log p(chunk(a') | h)),

the sum of the chunk's token log-probs (logits divided by the temperature first),
renormalised over the legal actions, so the model can never choose an illegal action.

Scoring is batched with one KV cache: a `Context` runs all prompts of a batch once
(right-padded, explicit position ids), then the candidate actions of every row in one more
forward on a copy of the cache expanded to one row per candidate. Rollouts (lmcoh.lm.rollout)
and tabulation (lmcoh.lm.tabulate) reuse the same `Context` and extend it with the chosen
action and the next state.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from ..errors import ModelError
from ..tasks.task import Task
from .text import PROMPT_MODES, action_chunk, goal_prefix, state_chunk

# ---- text -> token ids ---------------------------------------------------------------------------
class Codec:
    """Token ids of the text chunks of one task, tokenised once each.

    Every chunk starts with a space (lmcoh.text), so a prompt's ids are the concatenation of
    its chunks' ids, preceded by the BOS token when the tokenizer adds one.
    """

    def __init__(self, tokenizer, task: Task, mode: str = "history"):
        if mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {mode!r}; choose one of {', '.join(PROMPT_MODES)}")
        self.tokenizer, self.task, self.mode = tokenizer, task, mode
        self.bos = _bos_ids(tokenizer)
        self._cache: dict[str, list[int]] = {}
        self.actions = [tuple(self.ids(action_chunk(name))) for name in task.action_names]

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return self._cache[text]

    def encode(self, text: str) -> list[int]:
        """A whole prompt string, as the model saw it in training."""
        return self.bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, goal: str, states, actions) -> list[int]:
        """Ids of ``lmcoh.text.prompt(task, goal, states, actions, mode)``."""
        t = len(states) - 1
        ids = self.bos + self.ids(goal_prefix(goal))
        if self.mode == "markov":
            return ids + self.ids(state_chunk(self.task, states[-1], t, "markov"))
        for step, s in enumerate(states):
            ids = ids + self.ids(state_chunk(self.task, s, step))
            if step < len(actions):
                ids = ids + list(self.actions[actions[step]])
        return ids

    def state(self, s: int, t: int) -> list[int]:
        return self.ids(state_chunk(self.task, s, t, self.mode))


def _bos_ids(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_specials = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if with_specials[:1] == [bos] else []


# ---- a batch of contexts sharing one KV cache ---------------------------------------------------
class Context:
    """Token contexts of several rows with their KV cache and next-token log-probs.

    Rows are right-padded; pads stay in the cache, masked out, so every query always sees at
    least one real token and positions count real tokens only. Logits are computed only at
    the positions that are scored (``logits_to_keep``), so a large vocabulary costs little.
    """

    def __init__(self, model, batch: int, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model, self.temperature = model, float(temperature)
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.next_logp: torch.Tensor | None = None  # batch x vocab, at each row's last real token

    def __len__(self) -> int:
        return len(self.length)

    def take(self, rows) -> "Context":
        """A new context holding copies of ``rows`` (indices, repeats allowed), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        out = Context.__new__(Context)
        out.model, out.temperature, out.device = self.model, self.temperature, self.device
        out.cache = DynamicCache([(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                  for layer in self.cache.layers])
        out.mask, out.length = self.mask[rows], self.length[rows]
        out.next_logp = None if self.next_logp is None else self.next_logp[rows]
        return out

    @torch.inference_mode()
    def extend(self, chunks: list[list[int]], targets: list[tuple[int, ...]] | None = None
               ) -> np.ndarray | None:
        """Append ``chunks[i]`` (non-empty) to row i; update the cache and next-token log-probs.

        With ``targets``, also return log p(targets[i] | the row's context before the call),
        where each chunk continues its target: ``targets[i][:len(chunks[i])]`` is a prefix of
        ``chunks[i]``, and a target may be one token longer than its chunk (its last token is
        then read off the new next-token log-probs, without running it).
        """
        ids, new_mask, n = _pad(chunks, self.device)
        col = torch.arange(ids.shape[1], device=self.device)[None, :]
        last = col == (n - 1)[:, None]
        scored = torch.zeros_like(last)
        if targets is not None:  # position j predicts target token j + 1
            k = torch.as_tensor([len(x) - 1 for x in targets], device=self.device)
            scored = col < k[:, None]
            tgt, _, _ = _pad([list(x[1:]) or [0] for x in targets], self.device)
            tgt = torch.nn.functional.pad(tgt, (0, ids.shape[1] - tgt.shape[1]))
        keep = last | scored
        pos = _positions(self.length, new_mask)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                         cache=self.cache, use_cache=True, logits_to_keep=keep)
        logits = out.logits if out.logits.dim() == 2 else out.logits[keep]
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        flat = (torch.cumsum(keep.flatten(), 0) - 1).view(keep.shape)  # row of `logp` per position
        result = None
        if targets is not None:
            first = torch.as_tensor([x[0] for x in targets], device=self.device)
            total = self.next_logp[torch.arange(len(n), device=self.device), first].double()
            r, c = scored.nonzero(as_tuple=True)
            picked = logp[flat[r, c], tgt[r, c]].double()
            result = total.index_add(0, r, picked).cpu().numpy()
        self.cache = out.cache
        self.next_logp = logp[flat[last]]
        self.length = self.length + n
        return result

    def score(self, candidates: list[list[tuple[int, ...]]]) -> tuple[list[np.ndarray], "Context"]:
        """log p(candidate | row) for each row's candidate token sequences (not renormalised),
        and the context of every (row, candidate) continued by that candidate, flattened."""
        rows = np.repeat(np.arange(len(candidates)), [len(c) for c in candidates])
        flat = [list(c) for cands in candidates for c in cands]
        branch = self.take(rows)
        out = branch.extend(flat, targets=flat)
        bounds = np.cumsum([0] + [len(c) for c in candidates])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])], branch


def _pad(chunks: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    ids = np.zeros((len(chunks), int(n.max())), dtype=np.int64)
    mask = np.arange(ids.shape[1])[None, :] < n[:, None]
    ids[mask] = np.fromiter((i for c in chunks for i in c), dtype=np.int64, count=int(n.sum()))
    return (torch.from_numpy(ids).to(device), torch.from_numpy(mask.astype(np.int64)).to(device),
            torch.from_numpy(n).to(device))


def _positions(length: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of appended tokens: real ones continue each row, pads repeat the next slot."""
    return length[:, None] + (torch.cumsum(new_mask, dim=1) - new_mask) * new_mask


def renormalise(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities over the legal actions: subtract the log-sum-exp."""
    check_finite(logp)
    m = logp.max()
    return logp - (m + np.log(np.exp(logp - m).sum()))


def check_finite(logp: np.ndarray) -> None:
    """`ModelError` for scores a sound model cannot give (NaN, or every action impossible)."""
    if np.isnan(logp).any() or not np.isfinite(logp.max()):
        raise ModelError("the model's action probabilities are not finite: its weights hold NaN or inf "
                         "(a diverged training run)")


def score_contexts(model, contexts: list[list[int]], candidates: list[list[tuple[int, ...]]],
                   temperature: float = 1.0, batch_size: int = 256) -> list[np.ndarray]:
    """Renormalised log pi(a | context) for each context's candidates, ``batch_size`` at a time."""
    out = []
    for lo in range(0, len(contexts), batch_size):
        ctx = Context(model, len(contexts[lo:lo + batch_size]), temperature)
        ctx.extend(contexts[lo:lo + batch_size])
        out.extend(renormalise(x) for x in ctx.score(candidates[lo:lo + batch_size])[0])
    return out


def action_logprobs(loaded, task: Task, prompts: list[str], states: list[int],
                    temperature: float = 1.0, batch_size: int = 256) -> list[np.ndarray]:
    """log pi(a | prompt) over the legal actions of ``states[i]`` (in ``task.actions_of`` order)."""
    codec = Codec(loaded.tokenizer, task)
    contexts = [codec.encode(p) for p in prompts]
    candidates = [[codec.actions[a] for a in task.actions_of(s)] for s in states]
    return score_contexts(loaded.model, contexts, candidates, temperature, batch_size)
