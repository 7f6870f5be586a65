"""The `SFTTrainer` lmcoh trains with: TRL's, with each token's work done once.

An episode's loss falls on its actions' tokens, a few of the sixty or so tokens of a
transcript, and the transcripts of a small task repeat and share their beginnings. TRL's SFT
loss scores every position of the batch through its fused LM head when no Triton kernel is at
hand (on a CPU), and runs every transcript whole. `ActionSFTTrainer` merges the batch's
transcripts into prefix trees (`pack_prefixes`): each distinct prefix is run once, every token
attending to its own transcript's earlier tokens only (a 4D attention mask; positions are
depths in the tree), the output layer runs only where a loss is taken (transformers'
``logits_to_keep``), and each loss term is weighted by how many of the batch's transcripts
share it. The hidden states are those of the transcripts run one by one, so the loss and its
gradient are the batch's own: TRL's summed negative log-likelihood of the completion tokens
over ``num_items_in_batch``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from trl import SFTTrainer


def keeps_logits(model) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (most transformers causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


@dataclass
class PrefixTrees:
    """Transcripts merged into prefix trees, one tree per row of ``ids`` (padded at the end)."""

    ids: torch.Tensor        # (rows, width) the tokens, each tree in depth-first order
    positions: torch.Tensor  # (rows, width) each token's position in its transcripts
    mask: torch.Tensor       # (rows, width, width) True where a token sees another: itself and its ancestors
    keep: torch.Tensor       # (rows, width) the tokens whose next-token logits a loss term reads
    logit_row: torch.Tensor  # (terms,) for each loss term, its row among the kept logits (row-major order)
    targets: torch.Tensor    # (terms,) the token each loss term predicts
    weights: torch.Tensor    # (terms,) how many transcripts share the term
    tokens: int              # the real tokens, without padding


def pack_prefixes(transcripts: list[tuple[list[int], list[int]]], counts: list[int], width: int,
                  pad_id: int = 0) -> PrefixTrees:
    """Merge ``transcripts`` (token ids and labels, -100 where no loss is taken), transcript i
    occurring ``counts[i]`` times, into prefix trees of at most ``width`` tokens (more when one
    transcript is longer). Two transcripts share a token while their ids and labels agree."""
    order = sorted(range(len(transcripts)), key=lambda i: list(zip(*transcripts[i])))
    trees: list[dict] = []
    previous: list[tuple[int, int]] = []
    for i in order:
        pairs = list(zip(*transcripts[i]))
        shared = 0
        if trees:
            while shared < min(len(pairs), len(previous)) and pairs[shared] == previous[shared]:
                shared += 1
        if not trees or len(trees[-1]["ids"]) + len(pairs) - shared > width:
            trees.append({"ids": [], "labels": [], "depth": [], "parent": [], "weight": [], "path": []})
            shared = 0
        tree = trees[-1]
        path = tree["path"][:shared]
        for depth in range(shared, len(pairs)):
            tree["ids"].append(pairs[depth][0])
            tree["labels"].append(pairs[depth][1])
            tree["depth"].append(depth)
            tree["parent"].append(path[-1] if path else -1)
            tree["weight"].append(0)
            path.append(len(tree["ids"]) - 1)
        for node in path:
            tree["weight"][node] += counts[i]
        tree["path"], previous = path, pairs
    size = max(len(t["ids"]) for t in trees)
    ids = np.full((len(trees), size), pad_id, dtype=np.int64)
    positions = np.zeros((len(trees), size), dtype=np.int64)
    mask = np.broadcast_to(np.eye(size, dtype=bool), (len(trees), size, size)).copy()
    keep = np.zeros((len(trees), size), dtype=bool)
    terms = []  # (row, parent, target, weight)
    for row, tree in enumerate(trees):
        n = len(tree["ids"])
        ids[row, :n], positions[row, :n] = tree["ids"], tree["depth"]
        for node, parent in enumerate(tree["parent"]):
            if parent >= 0:
                mask[row, node] |= mask[row, parent]
                if tree["labels"][node] != -100:
                    keep[row, parent] = True
                    terms.append((row, parent, tree["ids"][node], tree["weight"][node]))
    rank = np.cumsum(keep.ravel()).reshape(keep.shape) - 1  # row of each kept token among the logits
    rows, parents, targets, weights = (np.array(x, dtype=np.int64) for x in zip(*terms)) if terms else \
        (np.zeros(0, dtype=np.int64),) * 4
    return PrefixTrees(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(mask),
                       torch.from_numpy(keep), torch.from_numpy(rank[rows, parents]), torch.from_numpy(targets),
                       torch.from_numpy(weights), sum(len(t["ids"]) for t in trees))


class ActionSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose training loss runs the batch's transcripts as prefix trees
    (`pack_prefixes`) and reads the logits at the loss positions only. Anything this path does
    not cover (a model without ``logits_to_keep``, a custom loss, label smoothing, outputs asked
    for, padding-free batches) goes to TRL's own. ``computed_tokens`` counts the tokens the model
    has run, for the throughput."""

    computed_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                or self.args.loss_type != "nll" or set(inputs) - {"input_ids", "attention_mask", "labels"}
                or not keeps_logits(self.model)):
            self.computed_tokens += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids, labels = inputs["input_ids"], inputs["labels"]
        lengths = inputs["attention_mask"].sum(dim=1) if "attention_mask" in inputs else torch.full_like(ids[:, 0],
                                                                                                          ids.shape[1])
        distinct: dict[tuple, int] = {}
        for row, label, n in zip(ids.tolist(), labels.tolist(), lengths.tolist()):
            key = (tuple(row[:n]), tuple(label[:n]))
            distinct[key] = distinct.get(key, 0) + 1
        hidden = self.model.config.get_text_config().hidden_size
        width = max(2 * int(lengths.max()), 2 * hidden)  # attention over a tree costs width / (6 hidden) of the rest
        trees = pack_prefixes(list(distinct), list(distinct.values()), width, self.processing_class.pad_token_id or 0)
        self.computed_tokens += trees.tokens
        device = ids.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.model.get_input_embeddings().weight.dtype)
        mask = trees.mask.to(device)
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
        logits = model(input_ids=trees.ids.to(device), attention_mask=bias[:, None], position_ids=trees.positions.to(device),
                       logits_to_keep=trees.keep.to(device), use_cache=False).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp[trees.logit_row.to(device), trees.targets.to(device)]
        weights = trees.weights.to(device, nll.dtype)
        loss = (nll * weights).sum() / (weights.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients over ranks
        return loss
