"""LoRA adapters and the goal markers a pretrained model learns.

A pretrained causal LM becomes a policy by training a LoRA adapter (peft) and the embedding
rows of the text format's markers (``<success>``, ``<failure>``, ``<eoa>``), which
`add_markers` adds to its tokenizer: through peft's ``trainable_token_indices`` (the model's own
vocabulary frozen), or with the whole embedding matrix (`train_embeddings`).
"""

from __future__ import annotations

import torch

from ..errors import ModelError, first_line
from .loading import LoadedModel
from .text import MARKERS


def add_lora(model, config):
    """Wrap ``model`` in a trainable adapter made by ``config`` (a peft `LoraConfig`); an adapter
    that does not fit the model (target modules or parameters it lacks) is one `ModelError` line."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"the LoRA adapter does not fit the model: {first_line(err)}") from None


def add_markers(loaded: LoadedModel, seed: int = 0) -> list[int]:
    """Add the text format's markers (`lmcoh.lm.text.MARKERS`) that the tokenizer lacks as special
    tokens and grow the embeddings to fit. Returns the new tokens' ids (to be trained: `lora_config`).

    Each new row (input, and output when untied) is drawn, seeded, from a normal distribution with
    the mean and covariance of the existing rows (as transformers' ``mean_resizing``): it starts
    as a typical token, and the goal markers start apart, where rows set to the mean would start
    as a short, shared vector that a LoRA run needs many steps to pull apart.
    """
    from tokenizers import AddedToken

    tokenizer, model = loaded.tokenizer, loaded.model
    missing = [m for m in MARKERS if m not in tokenizer.get_vocab()]
    if not missing:
        return []
    old = model.get_input_embeddings().weight.shape[0]
    # lstrip: a marker takes the space before it, one token fewer per action
    tokenizer.add_tokens([AddedToken(m, special=True, normalized=False, lstrip=True) for m in missing],
                         special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(missing)
    if len(tokenizer) > old:  # an embedding matrix may already have spare rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in {id(x.weight): x for x in (model.get_input_embeddings(), model.get_output_embeddings())
                      if x is not None}.values():  # a tied output layer shares the input rows
            rows = layer.weight[:min(ids)].double().cpu()
            mean = rows.mean(dim=0)
            cov = (rows - mean).T @ (rows - mean) / len(rows)
            scale = torch.linalg.cholesky(cov + 1e-9 * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype))
            draw = mean + torch.randn(len(ids), len(mean), generator=generator, dtype=cov.dtype) @ scale.T
            layer.weight[ids] = draw.to(layer.weight)
    return ids


def train_embeddings(model) -> None:
    """Make the embedding matrix of ``model`` (a peft model) trainable: the input rows and, when
    untied, the output rows; the rest of the base stays frozen."""
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None:
            layer.weight.requires_grad_(True)


def lora_config(model, r: int, alpha: int, target_modules="all-linear", new_tokens=()):
    """A peft `LoraConfig`: LoRA of rank ``r`` on ``target_modules`` plus, through
    ``trainable_token_indices``, the embedding rows of ``new_tokens`` (input and output rows; one
    matrix when they are tied). The rest of the model's vocabulary stays frozen."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    indices = None
    if new_tokens:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        indices = list(new_tokens)
        if head is not None and head.weight is not embed.weight:
            names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
            indices = {names[embed]: list(new_tokens), names[head]: list(new_tokens)}
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                      task_type="CAUSAL_LM", trainable_token_indices=indices,
                      fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))  # GPT-2's layers
