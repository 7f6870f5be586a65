"""How episodes are written: the three formats, prompt modes, the goal's place and wording."""

import pytest

from lmcoh.errors import ModelError
from lmcoh.lm.text import FORMATS, Layout, Writer, episode_record
from lmcoh.tasks.episodes import Episode

RIDGE = "You are on a narrow ridge. The gold is above, a chasm below."
START = "You stand at the start of the mountain race."


def test_compact_writes_the_goal_before_every_action(mountain):
    w = Writer(mountain)
    assert w.episode("success", [0, 1], [0, 2]) == (
        f"[start] {START} <success> up <eoa> [ridge] {RIDGE} <success> up <eoa>")
    assert w.episode("none", [0, 1], [0, 2]) == f"[start] {START} > up <eoa> [ridge] {RIDGE} > up <eoa>"
    assert w.prompt("failure", [0, 1], [0]) == f"[start] {START} <failure> up <eoa> [ridge] {RIDGE} <failure>"
    markov = Writer(mountain, Layout(mode="markov"))
    assert markov.prompt("success", [0, 1], [0]) == f"@1 [ridge] {RIDGE} <success>"


def test_natural_is_one_line_per_decision(mountain):
    w = Writer(mountain, Layout("natural"))
    assert w.episode("success", [0, 1], [0, 2]) == (
        f"Step 1 (start). {START} Choices: up, down. <success> You choose: up\n"
        f"Step 2 (ridge). {RIDGE} Choices: up, down. <success> You choose: up\n")
    stated = Writer(mountain, Layout("natural", "markov", goal_text="Reach the gold."))
    assert stated.prompt("success", [0, 1], [0]) == (
        f"Step 2 (ridge). {RIDGE} Choices: up, down. Reach the gold. You choose:")
    assert stated.prompt("failure", [0, 1], [0]).endswith("<failure> You choose:")  # the text states success only


def test_chat_renders_the_tokenizers_template(mountain, llama_tokenizer):
    w = Writer(mountain, Layout("chat"), llama_tokenizer)
    assert w.episode("success", [0, 1], [0, 2]) == (
        f"<s><|im_start|>system\n{mountain.description} <success><|im_end|>\n"
        f"<|im_start|>user\nStep 1 (start). {START} Choices: up, down. <success><|im_end|>\n"
        "<|im_start|>assistant\nup<|im_end|>\n"
        f"<|im_start|>user\nStep 2 (ridge). {RIDGE} Choices: up, down. <success><|im_end|>\n"
        "<|im_start|>assistant\nup<|im_end|>\n")
    assert w.prompt("none", [0], []).endswith("Choices: up, down.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["history", "markov"])
def test_chunks_concatenate_to_the_whole_text(fmt, mode, trie_task, llama_tokenizer):
    w = Writer(trie_task, Layout(fmt, mode), llama_tokenizer)
    states, actions = [0, 1], [0, 4]  # base -climb the ridge-> ridge -climb the wall->
    for goal in ("success", "none"):
        if mode == "history":
            whole = w.header(goal) + w.state(goal, 0, 0) + w.action(0) + w.state(goal, 1, 1)
            assert w.prompt(goal, states, actions[:1]) == whole
            assert w.episode(goal, states, actions) == whole + w.action(4)
        assert w.answered(goal, states, actions[:1], 4) == w.prompt(goal, states, actions[:1]) + w.action(4)


def test_bad_layouts_fail_in_one_line(mountain, gpt2_tokenizer):
    for call, match in [(lambda: Layout("prose"), "unknown format 'prose'"),
                        (lambda: Layout(mode="full"), "unknown prompt mode"),
                        (lambda: Layout(goal_text="  "), "goal text must be one line"),
                        (lambda: Layout(goal_text="win <now>"), "goal text must be one line"),
                        (lambda: Writer(mountain, Layout("chat"), gpt2_tokenizer), "with a chat template, and this one has none$"),
                        (lambda: Writer(mountain, Layout("chat")), "chat template")]:
        with pytest.raises(ModelError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_a_template_that_does_not_render_turn_by_turn_is_refused(mountain, llama_tokenizer):
    copy = llama_tokenizer.__class__(tokenizer_object=llama_tokenizer.backend_tokenizer)
    copy.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"  # newest turn first
    with pytest.raises(ModelError, match="turn by turn"):
        Writer(mountain, Layout("chat"), copy).state("none", 1, 1)


def test_a_template_that_refuses_the_conversation_is_one_line(mountain, llama_tokenizer):
    copy = llama_tokenizer.__class__(tokenizer_object=llama_tokenizer.backend_tokenizer)
    copy.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"  # Gemma's: no system turn
                          "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ModelError, match=r"refuses lmcoh's conversation \(System role not supported\)") as info:
        Writer(mountain, Layout("chat"), copy).prompt("success", [0], [])
    assert "\n" not in str(info.value)


def test_episode_record_holds_the_text_in_its_layout(mountain):
    episode = Episode([0, 1, 3], [0, 2], [-0.5, -0.1], 1.0, True, "success")
    record = episode_record(Writer(mountain, Layout("natural")), episode)
    assert record["text"].startswith("Step 1 (start).") and record["actions"] == ["up", "up"]
