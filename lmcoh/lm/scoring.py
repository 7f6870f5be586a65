"""Exact action scoring: a language model's probability of each legal action, batched.

The model reads a prompt (lmcoh.lm.text) and writes an action chunk. Its probability of legal
action ``a`` after history ``h`` is

    pi(a | h) = p(text(h) + chunk(a)) / sum over legal a' of p(text(h) + chunk(a')),

where p(text) is the product of the probabilities of the tokens the model reads for ``text``,
the whole text tokenised at once (logits divided by the temperature first). So the model can
never choose an illegal action.

Tokens at chunk boundaries. Tokenising a prompt and an action chunk apart need not give the
tokens of their concatenation: byte-level BPE may merge across the boundary, a SentencePiece
tokenizer prepends a space to every text it is given, a chat template's markers sit right
against the reply. So the `Codec` tokenises every boundary in context: a state chunk S with
each action chunk A after it, as S alone and as S + A. Where they disagree at the end of S,
the last ``back`` tokens of S are tokenised anew with the action: scoring takes them back from
the row's cache (`Context.extend`) and scores the action's tokens from there, the same
``back`` for every action of the state, so the scores differ from log p(text(h) + chunk(a)) by
one constant per history, which renormalising removes. The boundary between an action and the
next state is handled alike. Where tokenising apart and together agree (the word-level
tokenizer, mostly byte-level BPE) ``back`` is 0 and the chunks simply concatenate. The Codec
checks the composition against whole-text tokenisation on sample episodes when it is built,
and refuses (`ModelError`) a tokenizer whose boundaries reach beyond the neighbouring chunk.

Scoring is batched with one KV cache: a `Context` runs all prompts of a batch once
(right-padded, explicit position ids), then the candidate actions of every row in one more
forward on a copy of the cache expanded to one row per candidate. Rollouts (lmcoh.lm.rollout)
and tabulation (lmcoh.lm.tabulate) reuse the same `Context` and extend it with the chosen
action and the next state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache

from ..errors import DivergenceError, ModelError
from ..tasks.task import Task
from . import memory
from .text import Layout, Writer, goal_prefix

Chunk = tuple[int, ...]


# ---- text -> token ids ---------------------------------------------------------------------------
class Codec:
    """Token ids of one task's text, in one layout, under one goal, as the model reads them.

    ``choices(s, t)`` gives ``(back, tokens)``: after the chunk of state ``s`` at step ``t``, take
    back ``back`` tokens and the legal actions read as ``tokens[i]``. ``follow(a, s, t)`` gives
    ``(back, tokens)`` for the state chunk of ``s`` at step ``t`` after action ``a``'s tokens.
    """

    def __init__(self, tokenizer, task: Task, layout: Layout = Layout(), goal: str = "success",
                 check: bool = True):
        goal_prefix(goal)
        self.tokenizer, self.task, self.layout, self.goal = tokenizer, task, layout, goal
        self.writer = Writer(task, layout, tokenizer)
        self.bos = [] if layout.format == "chat" else _bos_ids(tokenizer)  # a chat template writes its own
        self._ids: dict[str, Chunk] = {}
        self._choices: dict[tuple[int, int], tuple[int, list[Chunk]]] = {}
        self._follow: dict[tuple[int, int, int], tuple[int, Chunk]] = {}
        self.action_tokens = ActionTokens(self)
        if check:
            self.check()

    def _tokenize(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if todo:
            for text, ids in zip(todo, self.tokenizer(todo, add_special_tokens=False)["input_ids"]):
                self._ids[text] = tuple(ids)

    def encode(self, text: str) -> list[int]:
        """A whole text, as the model reads it."""
        return self.bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, states, actions) -> list[int]:
        """Ids of ``Writer.prompt(goal, states, actions)``, tokenised whole."""
        return self.encode(self.writer.prompt(self.goal, states, actions))

    def choices(self, s: int, t: int) -> tuple[int, list[Chunk]]:
        return self.choices_of([s], t)[0]

    def choices_of(self, states, t: int) -> list[tuple[int, list[Chunk]]]:
        """`choices` of each of ``states`` at step ``t``, tokenising new boundaries in one batch."""
        keys = [(int(s), t) for s in states]
        todo = [k for k in dict.fromkeys(keys) if k not in self._choices]
        if todo:
            w, task = self.writer, self.task
            pairs = [(w.state(self.goal, s, t), [w.action(a) for a in task.actions_of(s)]) for s, t in todo]
            self._tokenize([x for left, acts in pairs for x in [left] + [left + a for a in acts]])
            for key, (left, acts) in zip(todo, pairs):
                self._choices[key] = _boundary(self._ids[left], [self._ids[left + a] for a in acts])
        return [self._choices[k] for k in keys]

    def follow(self, a: int, s: int, t: int) -> tuple[int, Chunk]:
        return self.follow_of([a], [s], t)[0]

    def follow_of(self, actions, states, t: int) -> list[tuple[int, Chunk]]:
        """`follow` for each (action, next state) pair, the next state at step ``t``."""
        keys = [(int(a), int(s), t) for a, s in zip(actions, states)]
        todo = [k for k in dict.fromkeys(keys) if k not in self._follow]
        if todo:
            w = self.writer
            pairs = [(w.action(a), w.state(self.goal, s, t)) for a, s, t in todo]
            self._tokenize([x for left, right in pairs for x in (left, left + right)])
            for key, (left, right) in zip(todo, pairs):
                back, (tokens,) = _boundary(self._ids[left], [self._ids[left + right]])
                if back > 1:  # tabulation scores an action and runs the next state in one forward
                    raise ModelError(f"the tokenizer merges the {self.layout.format} text of the next state into "
                                     f"{back} tokens of the action {left.strip()!r}; use another --format")
                self._follow[key] = (back, tokens)
        return [self._follow[k] for k in keys]

    def lengths(self, candidates: int = 4) -> tuple[list[int], int, int]:
        """``(prompt, state, action)``, upper estimates for sizing the work (lmcoh.lm.memory):
        ``prompt[t]`` the tokens of the longest prompt at decision ``t`` (the history before the
        action), ``state`` those of the longest state chunk, ``action`` of the longest action
        (with the tokens it takes back). Only the ``candidates`` states of each step with the
        most text, and the actions with the longest names, are tokenised."""
        task, w = self.task, self.writer
        names = np.fromiter(map(len, task.action_names), dtype=np.int64, count=task.n_actions)
        written = np.concatenate([[0], np.cumsum(names + 2)])  # a state's choices, as listed
        size = written[task.action_ptr[1:]] - written[task.action_ptr[:-1]]
        size += np.fromiter((len(a) + len(b) for a, b in zip(task.state_names, task.state_texts)),
                            dtype=np.int64, count=task.n_states)
        longest_names = task.action_state[np.argsort(-names, kind="stable")[:candidates]]
        prompt, state, action = [], 0, 0
        markov = self.layout.mode == "markov"
        for t, layer in enumerate(task.layers):
            top = np.concatenate([layer.states[np.argsort(-size[layer.states], kind="stable")[:candidates]],
                                  longest_names[np.isin(longest_names, layer.states)]])
            top = list(dict.fromkeys(top.tolist()))
            choices = self.choices_of(top, t)
            action = max([action] + [back + len(c) for back, cs in choices for c in cs])
            texts = [w.state(self.goal, s, t) for s in top]
            self._tokenize(texts)
            chunk = max(len(self._ids[x]) for x in texts) + 1  # + 1: a token merged across the boundary
            state = max(state, chunk)
            if t == 0 or markov:
                prompt.append(max(len(self.prompt([s] * (t + 1), [])) for s in top))
            else:
                prompt.append(prompt[-1] + action + chunk)
        return prompt, state, action

    def episode(self, states, actions) -> tuple[list[int], list[int]]:
        """A transcript's ids (as the model reads it whole) and a mask of the actions' tokens."""
        ids = self.prompt(states[:1], [])
        mask = [0] * len(ids)
        steps = min(len(states), len(actions))
        for t in range(steps):
            s, a = int(states[t]), int(actions[t])
            back, tokens = self.choices(s, t)
            chunk = tokens[a - self.task.action_ptr[s]]
            del ids[len(ids) - back:], mask[len(mask) - back:]
            ids += chunk
            mask += [1] * len(chunk)
            if t + 1 < steps:
                back, chunk = self.follow(a, states[t + 1], t + 1)
                del ids[len(ids) - back:], mask[len(mask) - back:]
                ids += chunk
                mask += [0] * len(chunk)
        return ids, mask

    def check(self, episodes: int = 32, seed: int = 0) -> None:
        """`ModelError` unless the chunk-wise tokens equal whole-text tokenisation on ``episodes``
        prior episodes: every prompt, and every prompt followed by each legal action."""
        from ..tasks.episodes import sample_prior_episodes

        w, task, markov = self.writer, self.task, self.layout.mode == "markov"
        for ep in sample_prior_episodes(task, episodes, np.random.default_rng(seed)):
            row: list[int] = []
            for t in range(min(len(ep.states), len(ep.actions))):
                states, actions, s = ep.states[:t + 1], ep.actions[:t], int(ep.states[t])
                whole = self.prompt(states, actions)
                if t > 0 and not markov and row != whole:
                    _refuse(self.layout, w.prompt(self.goal, states, actions))
                row = whole
                back, tokens = self.choices(s, t)
                for a, chunk in zip(task.actions_of(s), tokens):
                    text = w.answered(self.goal, states, actions, a)
                    if row[:len(row) - back] + list(chunk) != self.encode(text):
                        _refuse(self.layout, text)
                a = int(ep.actions[t])
                row = row[:len(row) - back] + list(tokens[a - task.action_ptr[s]])
                if t + 1 < len(ep.actions) and not markov:
                    back, chunk = self.follow(a, ep.states[t + 1], t + 1)
                    row = row[:len(row) - back] + list(chunk)


def _boundary(left: Chunk, wholes: list[Chunk]) -> tuple[int, list[Chunk]]:
    """``(back, tails)``: each of ``wholes`` (tokens of left + a continuation) is ``left`` without
    its last ``back`` tokens, then its tail; ``back`` is the least that fits them all."""
    common = [next((i for i, (x, y) in enumerate(zip(left, whole)) if x != y), min(len(left), len(whole)))
              for whole in wholes]
    cut = min(common)
    return len(left) - cut, [whole[cut:] for whole in wholes]


def first_tokens(choices) -> set[int]:
    """The tokens a context must keep next-token log-probs of to score ``choices``, each a
    ``(back, tokens)`` pair: the actions' first tokens where nothing is taken back (a take-back
    scores them on a token run again)."""
    return {chunk[0] for back, chunks in choices if not back for chunk in chunks}


def _refuse(layout: Layout, text: str) -> None:
    raise ModelError(f"the {layout.format} text cannot be scored exactly with this tokenizer: its tokens for "
                     f"{text[-80:]!r} depend on more than the neighbouring chunk; use another --format")


class ActionTokens(Sequence):
    """The tokens the model reads for each flat action after its state's chunk (at the first step
    the state is reachable), computed on demand: the "tokens" of token-level incoherence."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.first_step = np.zeros(codec.task.n_states, dtype=np.int64)
        for t in reversed(range(len(codec.task.layers))):
            self.first_step[codec.task.layers[t].states] = t

    def __len__(self) -> int:
        return self.codec.task.n_actions

    def __getitem__(self, a: int) -> Chunk:
        task = self.codec.task
        s = int(task.action_state[a])
        return self.codec.choices(s, int(self.first_step[s]))[1][a - task.action_ptr[s]]


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
    least one real token and positions count real tokens only. Tokens taken back (see
    `Codec`) are masked out the same way. Logits are computed only at the positions that are
    scored (``logits_to_keep``), and of the next-token log-probs only those of the tokens that
    may be scored next are kept, so a large vocabulary costs little.
    """

    def __init__(self, model, batch: int, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model, self.temperature = model, float(temperature)
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.ids = torch.zeros(batch, 0, dtype=torch.long, device=self.device)  # the token in each slot
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
        # at each row's last real token: log-probs of the tokens `next_ids` (None: the whole vocabulary)
        self.next_logp: torch.Tensor | None = None
        self.next_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.length)

    def take(self, rows) -> "Context":
        """A new context holding copies of ``rows`` (indices, repeats allowed), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        out = Context.__new__(Context)
        out.model, out.temperature, out.device = self.model, self.temperature, self.device
        out.cache = DynamicCache([(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                  for layer in self.cache.layers])
        out.ids, out.mask, out.length = self.ids[rows], self.mask[rows], self.length[rows]
        out.next_logp = None if self.next_logp is None else self.next_logp[rows]
        out.next_ids = self.next_ids
        return out

    def _next(self, rows: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """log p(tokens[i] | row rows[i]) from the next-token log-probs kept."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if self.next_ids is None:
            return self.next_logp[rows, tokens]
        col = torch.searchsorted(self.next_ids, tokens).clamp_(max=max(len(self.next_ids) - 1, 0))
        if not len(self.next_ids) or not torch.equal(self.next_ids[col], tokens):
            raise RuntimeError("a token scored after the context was not among the next tokens it kept")
        return self.next_logp[rows, col]

    def _take_back(self, chunks: list, back) -> tuple[list, torch.Tensor]:
        """Mask out each row's last ``back[i]`` tokens and the one before them, which is put back
        in front of the row's chunk: run again, its logits score the chunk's first token."""
        gone = torch.as_tensor(back, dtype=torch.long, device=self.device)
        gone = torch.where(gone > 0, gone + 1, 0)
        real = self.mask.bool()
        rank = self.mask.flip(1).cumsum(1).flip(1)  # 1 at a row's last real token, 2 before it, ...
        again = ((self.ids * (real & (rank == gone[:, None]))).sum(1)).tolist()
        self.mask = self.mask.masked_fill(real & (rank <= gone[:, None]), 0)
        self.length = self.length - gone
        rerun = gone > 0
        return [[again[i]] + list(c) if r else list(c) for i, (c, r) in enumerate(zip(chunks, rerun.tolist()))], rerun

    @torch.inference_mode()
    def extend(self, chunks: list, targets: list[tuple[int, ...]] | None = None, back=None, then=None
               ) -> np.ndarray | None:
        """Append ``chunks[i]`` (non-empty) to row i, after taking back its last ``back[i]``
        tokens (none without ``back``); update the cache and next-token log-probs, of the tokens
        ``then`` only (the first tokens of what may be scored next; None: of every token).

        With ``targets``, also return log p(targets[i] | row i's context after the take-back),
        where ``targets[i][:-1]`` is a prefix of ``chunks[i]``: each target token is scored on the
        logits of the token before it, so the last one may differ from the chunk's or lie
        beyond it (read off the new next-token log-probs, without running it).
        """
        rerun = torch.zeros(len(chunks), dtype=torch.bool, device=self.device)
        if back is not None and any(back):
            chunks, rerun = self._take_back(chunks, back)
        ids, new_mask, n = _pad(chunks, self.device)
        col = torch.arange(ids.shape[1], device=self.device)[None, :]
        last = col == (n - 1)[:, None]
        scored = torch.zeros_like(last)
        if targets is not None:  # chunk position j scores tails[j]: the target after its first token,
            again = rerun.tolist()  # or all of it behind a token run again
            tails = [list(x) if r else list(x[1:]) for x, r in zip(targets, again)]
            scored = col < torch.as_tensor([len(x) for x in tails], device=self.device)[:, None]
            tgt, _, _ = _pad([x or [0] for x in tails], self.device)
            tgt = torch.nn.functional.pad(tgt, (0, max(0, ids.shape[1] - tgt.shape[1])))
        keep = last | scored
        pos = _positions(self.length, new_mask)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        self.ids = torch.cat([self.ids, ids], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                         cache=self.cache, use_cache=True, logits_to_keep=keep)
        logits = out.logits if out.logits.dim() == 2 else out.logits[keep]
        logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        norm = torch.logsumexp(logits, dim=-1)  # log p(token) = logit - norm: no vocabulary-wide copy kept
        flat = (torch.cumsum(keep.flatten(), 0) - 1).view(keep.shape)  # row of `logits` per position
        result = None
        if targets is not None:
            total = torch.zeros(len(chunks), dtype=torch.float64, device=self.device)
            cached = (~rerun).nonzero(as_tuple=True)[0]
            if len(cached):
                total[cached] = self._next(cached, [targets[i][0] for i in cached.tolist()]).double()
            r, c = scored.nonzero(as_tuple=True)
            at = flat[r, c]
            picked = (logits[at, tgt[r, c]] - norm[at]).double()
            result = total.index_add(0, r, picked).cpu().numpy()
        self.cache = out.cache
        at = flat[last]
        if then is None:
            self.next_ids, self.next_logp = None, logits[at] - norm[at, None]
        else:
            self.next_ids = torch.as_tensor(sorted(set(then)), dtype=torch.long, device=self.device)
            self.next_logp = logits[at[:, None], self.next_ids] - norm[at, None]
        self.length = self.length + n
        return result

    def score(self, candidates: list[list[tuple[int, ...]]], back=None) -> tuple[list[np.ndarray], "Context"]:
        """log p(candidate | row) for each row's candidate token sequences, after taking back
        ``back[i]`` tokens of row i (not renormalised: with a take-back, up to a constant per row),
        and the context of every (row, candidate) continued by that candidate, flattened."""
        counts = [len(c) for c in candidates]
        rows = np.repeat(np.arange(len(candidates)), counts)
        flat = [list(c) for cands in candidates for c in cands]
        branch = self.take(rows)
        out = branch.extend(flat, targets=flat, back=None if back is None else np.repeat(back, counts), then=())
        bounds = np.cumsum([0] + counts)
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])], branch


def open_context(model, prompts: list[list[int]], temperature: float = 1.0, then=None) -> Context:
    """A `Context` of ``prompts`` (``then`` as in `Context.extend`), their longest common prefix
    (a chat template's system turn, the task's header) run once for all rows."""
    common = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
    common = min(common, min(map(len, prompts)) - 1)  # every row runs its last token
    if common <= 0:
        ctx = Context(model, len(prompts), temperature)
        ctx.extend(prompts, then=then)
        return ctx
    head = Context(model, 1, temperature)
    head.extend([prompts[0][:common]], then=())
    ctx = head.take(np.zeros(len(prompts), dtype=np.int64))
    ctx.extend([p[common:] for p in prompts], then=then)
    return ctx


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
        raise DivergenceError("the model's action probabilities are not finite: its weights hold NaN or inf "
                         "(a diverged training run)")


def score_contexts(model, contexts: list[list[int]], candidates: list[list[tuple[int, ...]]],
                   back: list[int], temperature: float = 1.0, batch_size: int = 256) -> list[np.ndarray]:
    """Renormalised log pi(a | context) for each context's candidates (after taking back
    ``back[i]`` tokens of context i), ``batch_size`` at a time."""
    if not contexts:
        return []
    footprint = memory.Footprint.of(model)
    prompt = max(map(len, contexts))
    action = max(b + len(c) for b, cands in zip(back, candidates) for c in cands)
    actions = max(map(len, candidates))
    memory.check_context(footprint, prompt + action, "a prompt and its action")
    batch_size = memory.fit_rows(footprint, memory.scoring_row(footprint, prompt, actions, action), batch_size, 1,
                                 f"one prompt of {prompt} tokens and its {actions} actions")
    out = []
    for lo in range(0, len(contexts), batch_size):
        ctx = open_context(model, contexts[lo:lo + batch_size], temperature,
                           then=first_tokens(zip(back[lo:lo + batch_size], candidates[lo:lo + batch_size])))
        out.extend(renormalise(x) for x in ctx.score(candidates[lo:lo + batch_size], back[lo:lo + batch_size])[0])
    return out


def action_logprobs(loaded, task: Task, histories: list[tuple[list[int], list[int]]], goal: str = "success",
                    layout: Layout = Layout(), temperature: float = 1.0, batch_size: int = 256) -> list[np.ndarray]:
    """log pi(a | history) over the legal actions of each history's last state (in
    ``task.actions_of`` order); a history is (states, actions), one fewer action than states."""
    codec = Codec(loaded.tokenizer, task, layout, goal)
    contexts = [codec.prompt(states, actions) for states, actions in histories]
    choices = [codec.choices(states[-1], len(states) - 1) for states, _ in histories]
    return score_contexts(loaded.model, contexts, [c for _, c in choices], [b for b, _ in choices],
                          temperature, batch_size)
