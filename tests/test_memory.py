"""The language model's memory, estimated before it is allocated: the KV cache per token as the
model really holds it, a measured peak under the limit the estimate sized the batch for, and a
refusal in one line when not even one history fits."""

import multiprocessing
import os
import time

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import task_from_yaml, tiny_gpt2
from lmcoh.errors import BudgetError, ModelError
from lmcoh.lm import memory, scoring
from lmcoh.lm.builtin import build_tokenizer, new_llama
from lmcoh.lm.loading import LoadedModel
from lmcoh.lm.tabulate import tabulate
from lmcoh.lm.text import Layout

WORDS = " ".join(f"w{i}" for i in range(120))  # 120 tokens for the word-level tokenizer
# A tree of three decisions among four actions whose state texts are long: 21 histories, 64 rows
# at the last step, each of up to ~370 tokens.
LONG = f"""
name: long_texts
horizon: 3
start: s
states:
  s: {{text: "{WORDS}", actions: {{a: {{next: x}}, b: {{next: y}}, c: {{next: x}}, d: {{next: y}}}}}}
  x: {{text: "{WORDS}", actions: {{a: {{next: u}}, b: {{next: v}}, c: {{next: u}}, d: {{next: v}}}}}}
  y: {{text: "{WORDS}", actions: {{a: {{next: u}}, b: {{next: v}}, c: {{next: u}}, d: {{next: v}}}}}}
  u: {{text: "{WORDS}", actions: {{a: {{next: win}}, b: {{next: lose}}, c: {{next: win}}, d: {{next: lose}}}}}}
  v: {{text: "{WORDS}", actions: {{a: {{next: lose}}, b: {{next: win}}, c: {{next: win}}, d: {{next: lose}}}}}}
terminals:
  win: {{success: 1.0}}
  lose: {{success: 0.0}}
"""


def cache_bytes_per_token(model, tokens=5) -> float:
    ctx = scoring.Context(model, 2)
    ctx.extend([list(range(1, tokens + 1))] * 2)
    held = sum(t.numel() * t.element_size() for layer in ctx.cache.layers for t in (layer.keys, layer.values))
    return held / (2 * tokens)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_kv_cache_per_token_is_what_the_model_holds(kv_heads, mountain):
    tokenizer = build_tokenizer(mountain)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=64)
    model = LlamaForCausalLM(config).eval()
    assert memory.Footprint.of(model).kv_token == cache_bytes_per_token(model) == 3 * 2 * kv_heads * 8 * 4
    gpt2 = tiny_gpt2(mountain).model
    assert memory.Footprint.of(gpt2).kv_token == cache_bytes_per_token(gpt2) == 2 * 2 * 32 * 4


def _long_model():
    task = task_from_yaml(LONG, "long_texts")
    tokenizer = build_tokenizer(task)
    return task, LoadedModel(new_llama(tokenizer, hidden_size=128, num_layers=4, num_heads=8).eval(), tokenizer)


def _peak_under(extra: float, out) -> None:
    """In a forked child: tabulate the long-texts task under a limit ``extra`` bytes above what the
    child holds at the start; send back the rows chosen, the estimate unshrunk and the peak."""
    task, lm = _long_model()
    fp = memory.Footprint.of(lm.model)
    start = memory.resident_bytes()
    limit = start + extra
    os.environ["LMCOH_MEMORY_LIMIT_GB"] = str(limit / 2 ** 30)
    prompts, state, action = scoring.Codec(lm.tokenizer, task).lengths()
    unshrunk = start + 64 * memory.ALLOCATOR * memory.tabulation_row(fp, prompts, state, action)
    sized = []
    fit = memory.fit_rows
    memory.fit_rows = lambda *a: sized.append(fit(*a)) or sized[-1]
    table = tabulate(lm, task, batch_size=256)
    with open("/proc/self/status") as f:  # VmHWM: the peak resident size, from the fork on
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    out.put({"limit": limit, "unshrunk": unshrunk, "rows": sized, "peak": peak, "exact": table.exact,
             "success": table.success})


def test_the_peak_stays_under_the_limit_the_batch_was_sized_for():
    """Under a limit 250 MB above what the process holds, the estimate for all 64 rows of the
    last step at once exceeds the limit, so the batch shrinks, and the measured peak stays under it."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_peak_under, args=(250 * 2 ** 20, out))
    child.start()
    got = out.get(timeout=300)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got["unshrunk"] > got["limit"]  # without shrinking, the estimate says the work would not fit
    assert 4 <= got["rows"][0] < 64 and got["exact"] and 0 < got["success"] < 1
    assert got["peak"] <= got["limit"]


def test_a_history_that_cannot_fit_is_refused_in_one_line(monkeypatch):
    task, lm = _long_model()
    monkeypatch.setenv("LMCOH_MEMORY_LIMIT_GB", str((memory.resident_bytes() + 2 ** 20) / 2 ** 30))
    began = time.perf_counter()
    with pytest.raises(BudgetError) as err:
        tabulate(lm, task)
    message = str(err.value)
    assert "one history of long_texts (4 rows of up to" in message and "--memory_limit_gb" in message
    assert "\n" not in message and time.perf_counter() - began < 10
    with pytest.raises(BudgetError, match="one episode of long_texts"):
        from lmcoh.lm.rollout import sample_episodes

        sample_episodes(lm, task, 4, progress=False)


def test_a_history_beyond_the_context_is_refused():
    task, lm = _long_model()
    short = LoadedModel(new_llama(lm.tokenizer, hidden_size=16, num_heads=2, max_position_embeddings=100).eval(),
                        lm.tokenizer)
    with pytest.raises(ModelError, match="beyond the model's context of 100 tokens"):
        tabulate(short, task)
    with pytest.raises(ModelError, match="beyond the model's context"):
        tabulate(short, task, layout=Layout(mode="markov"), goal="none")
