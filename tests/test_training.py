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
    """Equal logits everywhere (what --learning_rate 1e6 leaves), or a probe loss risen past max(1.5 x, + 0.1)
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
    for before in (loss, loss + 1.0, loss / 1.4):
        watch.before = before
        watch.check(1.0, None)  # stayed, fell, or rose by less than the rule allows
    watch.before = (loss - 0.05) / 1.5
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


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("llama", False)])
def test_the_loss_at_the_action_positions_equals_trls(family, tied, gpt2_tokenizer, llama_tokenizer, mountain, tmp_path):
    """`ActionSFTTrainer`'s loss (the batch's transcripts run as prefix trees, logits at the loss positions
    only) has TRL's value and gradient, on a batch with repeated episodes and uneven lengths."""
    import datasets
    from trl import SFTTrainer

    from lmcoh.lm.trainer import ActionSFTTrainer

    lm, _ = conditioned(family, {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer}[family], tied)
    expose_head_bias(lm.model)
    ids = examples(lm, mountain, 6)
    ids = ids + ids[:3] + [(ids[0][0][:9], ids[0][1][:9])]  # repeats, and a short one
    data = datasets.Dataset.from_dict({"input_ids": [i for i, _ in ids], "completion_mask": [m for _, m in ids]})
    args = PolicySFTConfig(output_dir=str(tmp_path), global_batch_size=len(ids), disable_tqdm=True)
    results = []
    for cls in (SFTTrainer, ActionSFTTrainer):
        trainer = cls(model=lm.model, args=args, train_dataset=data, processing_class=lm.tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        lm.model.eval()  # no dropout: both losses see the same network
        lm.model.zero_grad()
        n = batch["labels"][:, 1:].ne(-100).sum()
        loss = trainer.compute_loss(lm.model, dict(batch), num_items_in_batch=n)
        loss.backward()
        grads = [p.grad.clone() for p in lm.model.parameters() if p.requires_grad]
        results.append((loss.item(), grads))
    assert 0 < trainer.computed_tokens < len({tuple(i) for i, _ in ids}) * max(len(i) for i, _ in ids) / 2
    (want, want_grads), (got, got_grads) = results
    assert got == pytest.approx(want, rel=1e-5)
    for a, b in zip(want_grads, got_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_gives_the_float32_loss_and_gradient(llama_tokenizer, mountain, tmp_path):
    """Under bfloat16 autocast (what `PolicySFTConfig` turns on where the CPU has bf16 in hardware), a batch's
    loss is float32's to 1%, its gradient points the same way (cosine above 0.99, norm within 5%), and every
    action token's log-probability is float32's to 0.05."""
    import datasets
    import torch.nn.functional as F

    from lmcoh.lm.trainer import ActionSFTTrainer

    lm, _ = conditioned("llama", llama_tokenizer, tied=False)
    ids = examples(lm, mountain, 8)
    data = datasets.Dataset.from_dict({"input_ids": [i for i, _ in ids], "completion_mask": [m for _, m in ids]})
    args = PolicySFTConfig(output_dir=str(tmp_path), global_batch_size=len(ids), disable_tqdm=True)
    trainer = ActionSFTTrainer(model=lm.model, args=args, train_dataset=data, processing_class=lm.tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    targets = batch["labels"][:, 1:]
    keep = F.pad(targets != -100, (0, 1), value=False)
    lm.model.eval()
    results = []
    for bf16 in (False, True):
        lm.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(lm.model, dict(batch))
            with torch.no_grad():
                logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  logits_to_keep=keep).logits
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in lm.model.parameters() if p.requires_grad])
        logp = F.log_softmax(logits.float(), -1).gather(1, targets[targets != -100][:, None])
        results.append((loss.item(), grad, logp))
    (loss32, grad32, logp32), (loss16, grad16, logp16) = results
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert F.cosine_similarity(grad16, grad32, dim=0).item() > 0.99
    assert grad16.norm().item() == pytest.approx(grad32.norm().item(), rel=0.05)
    assert (logp16 - logp32).abs().max().item() < 0.05


def test_prefix_trees_share_prefixes_and_weigh_each_loss_term_by_its_transcripts():
    from lmcoh.lm.trainer import pack_prefixes

    x = -100
    transcripts = [([1, 2, 3, 4], [x, x, 3, 4]), ([1, 2, 5], [x, x, 5]), ([1, 2, 3, 4], [x, x, x, 4]), ([7, 8], [x, 8])]
    trees = pack_prefixes(transcripts, [3, 1, 2, 1], width=7)
    # one tree: 1 2 shared, then 3 (no loss) 4, 3 (loss) 4, and 5; [7 8] does not fit: a second tree
    assert trees.tokens == 7 + 2 and trees.ids.shape == (2, 7)
    assert trees.ids.tolist() == [[1, 2, 3, 4, 3, 4, 5], [7, 8, 0, 0, 0, 0, 0]]
    assert trees.positions.tolist() == [[0, 1, 2, 3, 2, 3, 2], [0, 1, 0, 0, 0, 0, 0]]
    for row in range(2):  # every token sees itself and its ancestors, the tokens of its own transcript
        for j in range(7):
            seen = trees.mask[row, j].nonzero().flatten().tolist()
            assert seen[-1] == j and trees.positions[row, seen].tolist() == list(range(len(seen)))
    assert trees.mask[0, 5].nonzero().flatten().tolist() == [0, 1, 4, 5]
    terms = sorted(zip(trees.targets.tolist(), trees.weights.tolist()))
    assert terms == [(3, 3), (4, 2), (4, 3), (5, 1), (8, 1)]  # each term weighted by the copies that take it
    assert trees.keep.tolist() == [[False, True, True, False, True, False, False], [True] + [False] * 6]
    assert sorted(trees.logit_row.tolist()) == [0, 0, 1, 2, 3]  # the 3 and the 5 both read token 2's logits
