"""Exact scoring with any tokenizer: chunk-wise tokens against whole-text tokenisation, take-back."""

import numpy as np
import pytest
import torch

from conftest import TRIE, brute_logprobs, random_standin, task_from_yaml
from lmcoh.errors import ModelError
from lmcoh.lm import scoring
from lmcoh.lm.loading import LoadedModel
from lmcoh.lm.text import Layout, Writer

CASES = [("gpt2", "compact"), ("gpt2", "natural"), ("llama", "compact"), ("llama", "natural"), ("llama", "chat")]


def some_histories(task):
    """Every reachable history (states, actions) of up to two decisions."""
    out = [([int(s)], []) for s in np.flatnonzero(task.start_prob) if not task.terminal[s]]
    for states, actions in list(out):
        for a in task.actions_of(states[-1]):
            out += [(states + [n], actions + [a]) for n, _ in task.successors(a) if not task.terminal[n]]
    return out


@pytest.fixture(scope="module")
def tokenizers(gpt2_tokenizer, llama_tokenizer):
    return {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer}


@pytest.mark.parametrize("family, fmt", CASES)
@pytest.mark.parametrize("mode", ["history", "markov"])
def test_scores_equal_whole_text_log_probabilities(family, fmt, mode, tokenizers, trie_task):
    lm = random_standin(family, tokenizers[family], seed=1)
    layout = Layout(fmt, mode)
    histories = some_histories(trie_task)
    for goal in ("success", "none"):
        got = scoring.action_logprobs(lm, trie_task, histories, goal, layout, temperature=0.8)
        for (states, actions), g in zip(histories, got):
            want = brute_logprobs(lm, trie_task, layout, goal, states, actions, temperature=0.8)
            np.testing.assert_allclose(g, want, atol=1e-5)


@pytest.mark.parametrize("fmt", ["compact", "natural", "chat"])
def test_scores_equal_whole_text_on_smollm2s_tokenizer_and_template(fmt, smollm2_tokenizer, mountain):
    """SmolLM2's own byte-level BPE and chat template (a random model of its vocabulary: the tokenizer is
    what matters). The template writes its own system prompt into a conversation that has none (the trie
    without a description, with no goal) and ends every turn with <|im_end|> and a newline."""
    lm = random_standin("llama", smollm2_tokenizer, seed=1)
    bare = task_from_yaml(TRIE.replace("description: Multi-word actions sharing their first words.\n", ""), "bare")
    if fmt == "chat":
        assert "named SmolLM" in Writer(bare, Layout(fmt), smollm2_tokenizer).prompt("none", [0], [])
    cases = [(bare, Layout(fmt, mode), goal) for mode in ("history", "markov") for goal in ("success", "none")]
    for task, layout, goal in cases + [(mountain, Layout(fmt, goal_text="Reach the gold."), "success")]:
        histories = some_histories(task)
        got = scoring.action_logprobs(lm, task, histories, goal, layout, temperature=0.8)
        for (states, actions), g in zip(histories, got):
            want = brute_logprobs(lm, task, layout, goal, states, actions, temperature=0.8)
            np.testing.assert_allclose(g, want, atol=1e-5)


def test_the_sentencepiece_and_chat_cases_do_not_concatenate(tokenizers, trie_task):
    """The cases the in-context tokens exist for: tokenising a chunk alone differs from tokenising it in
    the whole text (SentencePiece's leading space, the chat template's markers)."""
    for family, fmt in (("llama", "compact"), ("llama", "chat")):
        tok = tokenizers[family]
        codec = scoring.Codec(tok, trie_task, Layout(fmt), "success")
        alone = tuple(tok(codec.writer.action(0), add_special_tokens=False)["input_ids"])
        assert codec.choices(0, 0)[1][0] != alone
    codec = scoring.Codec(tokenizers["gpt2"], trie_task, Layout(), "success")
    assert codec.choices(0, 0)[1][0] == tuple(tokenizers["gpt2"](codec.writer.action(0))["input_ids"])


def test_episode_ids_are_the_whole_text_and_the_mask_marks_the_actions(tokenizers, trie_task):
    for family, fmt in CASES:
        codec = scoring.Codec(tokenizers[family], trie_task, Layout(fmt), "failure")
        states, actions = [0, 1, 3], [0, 4]
        ids, mask = codec.episode(states, actions)
        assert ids == codec.encode(codec.writer.episode("failure", states, actions))
        chosen = [tok for tok, m in zip(ids, mask) if m]
        assert chosen == list(codec.choices(0, 0)[1][0]) + list(codec.choices(1, 1)[1][1])


def merging_tokenizer(task, merges):
    """Characters plus ``merges``, no pre-tokenizer: a BPE tokenizer whose tokens cross chunk boundaries."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    w = Writer(task)
    texts = [w.episode(g, [s, s], [a, a]) for g in ("success", "none") for s in range(task.n_states)
             for a in task.actions_of(s)]
    vocab = {c: i for i, c in enumerate(sorted(set("".join(texts)) | {"@"} | set("0123456789")))}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="@", pad_token="@")


def tiny_gpt2_for(tokenizer, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512)
    return LoadedModel(GPT2LMHeadModel(config).eval(), tokenizer)


@pytest.mark.parametrize("mode", ["history", "markov"])
def test_tokens_merging_across_chunks_are_taken_back(mode, mountain):
    """"<success>" + " up" merges into "s> u" and "<eoa>" + " [ridge]" into "a> [": scoring takes the
    merged tokens back from the cache and still equals whole-text scoring, in tabulation and rollouts."""
    from lmcoh.lm import rollout, tabulate

    tok = merging_tokenizer(mountain, [("s", ">"), ("s>", " "), ("s> ", "u"), ("a", ">"), ("a>", " "), ("a> ", "[")])
    lm, layout = tiny_gpt2_for(tok, seed=3), Layout(mode=mode)
    codec = scoring.Codec(tok, mountain, layout, "success")
    back, tails = codec.choices(0, 0)
    assert back == 1 and tok.convert_ids_to_tokens(list(tails[0][:1])) == ["s> u"]
    if mode == "history":
        assert codec.follow(0, 1, 1)[0] == 1
    table = tabulate.tabulate(lm, mountain, "success", layout=layout)
    for states, actions in some_histories(mountain):
        t = len(states) - 1
        i = int(np.flatnonzero(mountain.layers[t].states == states[-1])[0])
        lo, hi = mountain.layers[t].start[i], mountain.layers[t].start[i + 1]
        want = np.exp(brute_logprobs(lm, mountain, layout, "success", states, actions))
        np.testing.assert_allclose(table.policy[t][lo:hi], want, atol=1e-5)  # one history per state here
    episodes = list(rollout.rollout(lm, mountain, 40, layout=layout, progress=False))
    for episode, dists in episodes:
        for t, dist in enumerate(dists):
            want = brute_logprobs(lm, mountain, layout, "success", episode.states[:t + 1], episode.actions[:t])
            np.testing.assert_allclose(dist, np.exp(want), atol=1e-5)


def test_a_tokenizer_merging_deeper_into_the_action_is_refused(mountain):
    tok = merging_tokenizer(mountain, [(">", " "), ("a", "> ")])  # "a" ">" " [" -> "a> " "[": two tokens back
    with pytest.raises(ModelError, match="into 2 tokens of the action") as info:
        scoring.Codec(tok, mountain, Layout(), "success")
    assert "\n" not in str(info.value)


def test_take_back_equals_running_the_shorter_row_afresh(gpt2_tokenizer):
    lm = random_standin("gpt2", gpt2_tokenizer, seed=2)
    rows = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ctx = scoring.Context(lm.model, 2)
    ctx.extend(rows)
    chunks, targets = [[20, 21], [22]], [(20, 21, 23), (22, 24)]
    got = ctx.extend(chunks, targets=targets, back=[2, 0])
    fresh = [[5, 6, 7, 20, 21], [11, 12, 13, 22]]
    for row, ids, target, score in zip(range(2), fresh, targets, got):
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].double(), dim=-1)
        torch.testing.assert_close(ctx.next_logp[row].double(), logp[-1], atol=1e-5, rtol=0)
        start = len(ids) - len(chunks[row])
        full = ids[:start] + list(target)
        want = float(sum(logp[j - 1, full[j]] for j in range(start, len(full) - 1)) + logp[-1, full[-1]])
        assert score == pytest.approx(want, abs=1e-5)
