"""Small local stand-ins for pretrained hub checkpoints, built in seconds without a network.

Nothing here can download weights, so the tests and `python -m lmcoh.bench` build models of the
two families that small hub models come in, each with its own tokenizer trained on English text
(the docstrings of Python's standard library) and briefly pretrained on it:

* ``gpt2``: `GPT2Config`, a byte-level BPE tokenizer like GPT-2's (``Ġ`` marks a leading space,
  every byte is a token), no chat template;
* ``llama``: `LlamaConfig`, a SentencePiece-style BPE tokenizer like Llama 2's (``▁`` marks a
  space and one is prepended to every run of text between special tokens, so a text tokenised
  alone differs from the same text inside a longer one; unknown characters fall back to byte
  tokens; ``<s>`` is prepended) and a ChatML chat template.

Both have about a million parameters and tied input and output embeddings, and are saved with
``save_pretrained`` (safetensors), so they load like any hub directory. `save_gguf` writes the
``gpt2`` one as a GGUF file as GPT-2 checkpoints are published for llama.cpp (quantized matrices,
the tokenizer in the metadata, no chat template): a real GGUF of another family than SmolLM2's.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

FAMILIES = ("gpt2", "llama")
CHATML = ("{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Modules whose docstrings make the English corpus (a fixed list: the corpus is the same on every run).
_MODULES = ("argparse", "collections", "json", "re", "textwrap", "string", "random", "statistics",
            "pathlib", "shutil", "logging", "functools", "itertools", "dataclasses", "datetime",
            "decimal", "fractions", "heapq", "bisect", "csv", "email.message", "http.client",
            "urllib.parse", "unittest", "inspect", "ast", "tokenize", "pickle", "socket", "threading",
            "contextlib", "enum", "subprocess", "os", "zipfile", "tarfile", "calendar",
            "difflib", "pprint", "queue", "sched", "smtplib", "sqlite3", "tempfile", "uuid", "wave")


def english_text(max_chars: int = 300_000) -> str:
    """Paragraphs of English from the standard library's docstrings, one per line."""
    paragraphs, size = [], 0
    for name in _MODULES:
        module = importlib.import_module(name)
        # the module and its functions and classes: not its submodules, which are its attributes
        # only once something imported them, so the text would depend on what ran before
        members = [module] + [getattr(module, n) for n in sorted(vars(module))
                              if not n.startswith("_") and callable(getattr(module, n))]
        for member in members:
            doc = inspect.getdoc(member)
            for para in (doc or "").split("\n\n"):
                line = " ".join(para.split())
                if len(line) > 40 and line not in paragraphs:
                    paragraphs.append(line)
                    size += len(line) + 1
                    if size >= max_chars:
                        return "\n".join(paragraphs)
    return "\n".join(paragraphs)


def gpt2_tokenizer(text: str, vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``text``, set up like GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def llama_tokenizer(text: str, vocab_size: int = 2000):
    """A SentencePiece-style BPE tokenizer trained on ``text``, set up like Llama 2's (legacy
    leading space, byte fallback, ``<s>`` prepended) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(text.splitlines(), trainer)
    spec = json.loads(bpe.to_str())  # add the 256 byte tokens that byte fallback writes
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    bpe = Tokenizer.from_str(json.dumps(spec))
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHATML
    return tokenizer


def new_model(family: str, tokenizer, seed: int = 0, hidden_size: int = 128, num_layers: int = 4,
              initializer_range: float = 0.1):
    """A freshly initialised (seeded) model of ``family`` sized for ``tokenizer``, about 1M parameters.

    The initialisation is wider than the families' 0.02, so that a model this small, trained this
    briefly, grows embeddings long enough for confident predictions (real checkpoints have grown
    theirs). Conditioning does not depend on it: it trains the embeddings too (lmcoh.lm.pretrain),
    and models built at 0.02 condition as well (README, "Pretrained models")."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "initializer_range": initializer_range}
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=hidden_size, n_layer=num_layers,
                            n_head=4, **ids)
        cls = GPT2LMHeadModel
    elif family == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=4, intermediate_size=int(2.7 * hidden_size),
                             max_position_embeddings=1024, tie_word_embeddings=True, **ids)
        cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def train_on_text(model, tokenizer, text: str, steps: int = 400, batch_size: int = 16, length: int = 64,
                  learning_rate: float = 3e-3, seed: int = 0) -> float:
    """Next-token training on random windows of ``text``; returns the last step's loss."""
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 1.0 - (step - warmup) / (steps - warmup)))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length, (batch_size,), generator=gen)
        batch = torch.stack([ids[s:s + length] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build(family: str, out_dir: str | Path, seed: int = 0, steps: int = 400, text: str | None = None,
          **sizes) -> Path:
    """Build, briefly pretrain and save a stand-in of ``family`` into ``out_dir``; returns it.
    ``sizes`` go to `new_model` (``hidden_size``, ``num_layers``, ``initializer_range``)."""
    import torch

    text = english_text() if text is None else text
    tokenizer = {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer}[family](text)
    model = new_model(family, tokenizer, seed, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train_on_text(model, tokenizer, text, steps=steps, seed=seed)
    from .loading import quiet_hf

    out = Path(out_dir)
    with quiet_hf():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def save_gguf(model, tokenizer, path: str | Path) -> Path:
    """Write the ``gpt2`` stand-in ``model`` and its byte-level BPE ``tokenizer`` as the GGUF file
    ``path``: matrices in Q8_0 and norms and biases in float32, tensors named by the ``gguf``
    package's own map of GPT-2's names, and the vocabulary, merges and special tokens in the
    metadata (``tokenizer.ggml.*``), which is what transformers' GGUF reader expects."""
    import gguf
    import numpy as np
    from transformers.pytorch_utils import Conv1D

    config = model.config
    if config.model_type != "gpt2":
        raise ValueError(f"save_gguf writes the gpt2 stand-in, not a {config.model_type} model")
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("lmcoh gpt2 stand-in")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    conv = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or (tied and name == "output.weight"):  # a tied head is the token embeddings
            continue
        data = tensor.detach().cpu().float().numpy()
        if hf_name in conv:  # GPT-2's Conv1D stores (in, out); GGUF, like a Linear, (out, in)
            data = np.ascontiguousarray(data.T)
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
