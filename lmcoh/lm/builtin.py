"""lmcoh's built-in language model: a small Llama and a word-level tokenizer made for one task.

The built-in prior learns everything from random weights (lmcoh.lm.pretrain): its tokenizer has
one token per word of the task's compact text, so it reads only that format.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..errors import ModelError
from ..tasks.task import Task
from .text import SPECIAL_WORDS, Writer

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"


def task_words(task: Task) -> list[str]:
    """Every whitespace-separated word the compact format can write for ``task``, in first-seen order."""
    writer = Writer(task)
    words = dict.fromkeys(SPECIAL_WORDS)
    words.update(dict.fromkeys(f"@{t}" for t in range(task.steps)))
    for s in range(task.n_states):
        words.update(dict.fromkeys(writer.state("none", s, 0).split()))
    for a in range(task.n_actions):
        words.update(dict.fromkeys(writer.action(a).split()))
    return list(words)


def build_tokenizer(task: Task) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for ``task``: one token per word of its text, ``<bos>`` prepended."""
    vocab = {w: i for i, w in enumerate([PAD, BOS, EOS, UNK] + task_words(task))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def new_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
              intermediate_size: int | None = None, max_position_embeddings: int = 1024,
              initializer_range: float = 0.02, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised (seeded) Llama-architecture causal LM sized for ``tokenizer``."""
    if hidden_size % num_heads:
        raise ModelError(f"hidden size {hidden_size} is not a multiple of the {num_heads} heads")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
