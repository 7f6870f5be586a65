"""Training through TRL: new marker rows trained with peft's trainable tokens, the fused-head workaround."""

import numpy as np
import pytest
import torch

from conftest import random_standin
from lmcoh.lm.adapters import add_lora, add_markers, lora_config
from lmcoh.lm.text import MARKERS, Layout
from lmcoh.lm.configs import PolicySFTConfig
from lmcoh.lm.training import episode_examples, expose_head_bias, train_sft
from lmcoh.tasks.episodes import sample_outcome_balanced


def conditioned(family, tokenizer, tied=True):
    """A random stand-in with the markers added and a LoRA adapter that trains their rows."""
    import copy

    lm = random_standin(family, copy.deepcopy(tokenizer), seed=0)
    if not tied:
        lm.model.config.tie_word_embeddings = False
        head = lm.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    new = add_markers(lm)
    lm.model = add_lora(lm.model, lora_config(lm.model, r=4, alpha=8, new_tokens=new))
    return lm, new


def examples(lm, task, n=8):
    episodes = sample_outcome_balanced(task, n, np.random.default_rng(0))
    return episode_examples(lm.tokenizer, task, Layout(), [("success" if e.success else "failure", e)
                                                           for e in episodes])


def test_markers_are_special_tokens_with_rows_like_the_others(gpt2_tokenizer):
    import copy

    lm = random_standin("gpt2", copy.deepcopy(gpt2_tokenizer))
    rows = lm.model.get_input_embeddings().weight
    old, norm = len(lm.tokenizer), rows.norm(dim=1).mean()
    new = add_markers(lm)
    assert new == list(range(old, old + 3)) and lm.tokenizer.convert_ids_to_tokens(new) == list(MARKERS)
    rows = lm.model.get_input_embeddings().weight
    assert rows.shape[0] == old + 3 and lm.tokenizer("a <eoa>")["input_ids"][-1] == new[2]
    assert torch.allclose(rows[new].norm(dim=1), norm, rtol=0.5)  # typical rows, not the short mean
    assert not torch.equal(rows[new[0]], rows[new[1]])
    assert add_markers(lm) == []  # already there: nothing to add


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("llama", False)])
def test_training_updates_lora_and_the_new_rows_only(family, tied, gpt2_tokenizer, llama_tokenizer, mountain,
                                                     tmp_path):
    lm, new = conditioned(family, {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer}[family], tied)
    base = lm.model.get_base_model()
    before_in = base.get_input_embeddings().weight.detach().clone()
    before_out = base.get_output_embeddings().weight.detach().clone()
    args = PolicySFTConfig(output_dir=str(tmp_path), num_train_epochs=1, global_batch_size=4,
                           learning_rate=1e-2, disable_tqdm=True)
    train_sft(lm.model, lm.tokenizer, examples(lm, mountain), args)
    after_in = base.get_input_embeddings().weight.detach().cpu()  # the Trainer may have moved it to a GPU
    after_out = base.get_output_embeddings().weight.detach().cpu()
    old = slice(0, min(new))
    assert torch.equal(before_in[old], after_in[old]) and torch.equal(before_out[old], after_out[old])
    assert not torch.equal(before_in[new], after_in[new]) and not torch.equal(before_out[new], after_out[new])
    assert any(p.abs().sum() > 0 for n, p in lm.model.named_parameters() if "lora_B" in n)
    merged = lm.model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight[new].cpu(), after_in[new])


def test_trl_fused_head_needs_the_wrappers_bias(gpt2_tokenizer, mountain, tmp_path):
    """TRL's fused loss reads lm_head.bias, which peft's trainable-token wrapper lacks (known upstream):
    without `expose_head_bias` training fails; train_sft applies it."""
    from trl import SFTTrainer
    import datasets

    lm, _ = conditioned("gpt2", gpt2_tokenizer)
    ids = examples(lm, mountain, 2)
    data = datasets.Dataset.from_dict({"input_ids": [i for i, _ in ids], "completion_mask": [m for _, m in ids]})
    args = PolicySFTConfig(output_dir=str(tmp_path), max_steps=1, global_batch_size=2, disable_tqdm=True)
    with pytest.raises(AttributeError, match="bias"):
        SFTTrainer(model=lm.model, args=args, train_dataset=data, processing_class=lm.tokenizer).train()
    expose_head_bias(lm.model)
    assert lm.model.get_output_embeddings().bias is None
    SFTTrainer(model=lm.model, args=args, train_dataset=data, processing_class=lm.tokenizer).train()


def test_the_divergence_rule_catches_finite_blow_ups(mountain):
    """Equal logits everywhere (what --learning_rate 1e6 leaves), or a probe loss risen past max(2 x, + 0.1)
    of where training started, is a divergence; a loss that stays or falls is not."""
    from conftest import tiny_llama
    from lmcoh.errors import DivergenceError
    from lmcoh.lm.training import Divergence, probe_loss

    lm = tiny_llama(mountain)
    probe = episode_examples(lm.tokenizer, mountain, Layout(), [("success", e) for e in
                                                               sample_outcome_balanced(mountain, 8, np.random.default_rng(0))])
    loss, spread = probe_loss(lm.model, probe)
    assert spread > 0.01 and loss > 0
    watch = Divergence(lm.model, probe)
    for before in (loss, loss + 1.0, loss / 1.9):
        watch.before = before
        watch.check(1.0, None)  # stayed, fell, or rose by less than the rule allows
    watch.before = (loss - 0.05) / 2
    with pytest.raises(DivergenceError, match=rf"went from {watch.before:.4g} to {loss:.4g}\)$"):
        watch.check(1.0, None)
    with torch.no_grad():
        lm.model.lm_head.weight.zero_()  # every token the same logit
    assert probe_loss(lm.model, probe) == (pytest.approx(np.log(len(lm.tokenizer))), 0.0)
    watch.before = 10.0
    with pytest.raises(DivergenceError, match="the model gives every token the same probability"):
        watch.check(1.0, None)


@pytest.mark.parametrize("flags, n, message", [
    (["--dataloader_drop_last", "true"], 63, "63 examples make no batch of 64 per process"),
    (["--lr_scheduler_type", "polynomial", "--num_train_epochs", "1"], 32,
     r"the polynomial schedule's warmup \(1 steps\) takes every optimiser step \(1\)"),
    (["--lr_scheduler_type", "polynomial", "--num_train_epochs", "1", "--warmup_steps", "0"], 32, None),
    (["--lr_scheduler_type", "polynomial"], 64, None),  # 2 steps, 1 of warmup
    (["--dataloader_drop_last", "true"], 64, None),
    (["--max_length", "12"], 8, "max_length 12 would cut episodes of up to 14 tokens; lmcoh trains on whole"),
    (["--max_length", "14"], 8, None),
])
def test_settings_a_round_cannot_train_are_one_line(flags, n, message):
    """What TRL or transformers find only mid-run (an empty dataset or dataloader, a division by zero)
    is found first."""
    from conftest import recipe_args
    from lmcoh.errors import ModelError
    from lmcoh.lm.training import check_examples

    _, sft, _ = recipe_args(*flags)
    examples = [([1] * (10 + i % 5), [0] * 5 + [1] * (5 + i % 5)) for i in range(n)]
    if message is None:
        check_examples(sft, examples)
    else:
        with pytest.raises(ModelError, match=message):
            check_examples(sft, examples)
