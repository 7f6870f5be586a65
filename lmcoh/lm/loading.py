"""Load and save language models; open one for a task.

A model directory is a normal Hugging Face directory (``config.json``, safetensors weights,
tokenizer files), so ``AutoModelForCausalLM.from_pretrained`` reads it, plus ``lmcoh.json``:
lmcoh's own metadata (the task it was trained for, the text format, how it was trained).
Foreign directories (any local causal LM, e.g. GPT-2 with its BPE tokenizer) load too, with
empty metadata. An adapter directory holds a peft LoRA adapter, the tokenizer and an
``lmcoh.json`` that fingerprints the base model the adapter was trained on.

`open_for_task` is the one way a command opens a model for a task: load it (and an adapter),
choose the layout it is prompted in, and check that its tokenizer can write the task.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from .. import faults
from ..errors import ModelError, first_line
from ..io import replace_dir, write_json
from ..tasks.task import Task
from .gguf import cached_model_dir
from .text import FORMATS, Layout, Writer

# peft reads transformers' deprecated `is_gradient_checkpointing`: their warning, not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

META_FILE = "lmcoh.json"
TEXT_FORMAT = 2  # bump when lmcoh/text.py writes episodes differently


@dataclass
class LoadedModel:
    model: torch.nn.Module | None
    tokenizer: PreTrainedTokenizerFast
    meta: dict = field(default_factory=dict)  # lmcoh.json ({} for foreign models); adapter's under "adapter"
    device: str = "cpu"
    path: str = ""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path_or_id: str, adapter: str | None = None, device: str | None = None,
               offline: bool = True, trainable: bool = False, **init_kwargs) -> LoadedModel:
    """Load an lmcoh or any Hugging Face causal-LM directory, a GGUF file (lmcoh.lm.gguf) or a hub
    id for inference.

    Hub ids go to ``from_pretrained`` unchanged; with ``offline`` (or ``HF_HUB_OFFLINE=1``)
    only the local cache is consulted. Never runs remote code. ``init_kwargs`` go to
    ``from_pretrained`` (``dtype``, ``attn_implementation``, ``revision``,
    ``quantization_config``: see `model_init_kwargs`); ``trainable`` loads the adapter for
    further training.
    """
    device = device or default_device()
    loaded = load_tokenizer(path_or_id, offline)
    source, local_only = _source(path_or_id, offline)
    with _one_line(path_or_id, local_only):
        with quiet_hf():
            loaded.model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only,
                                                                use_safetensors=True, trust_remote_code=False,
                                                                **init_kwargs)
    if adapter is not None:
        loaded.model, loaded.meta["adapter"] = _attach_adapter(loaded.model, adapter, path_or_id, trainable)
    if "quantization_config" not in init_kwargs:  # quantized weights are placed by bitsandbytes
        loaded.model.to(device)
    loaded.model.eval()
    loaded.device = device
    return loaded


def load_tokenizer(path_or_id: str, offline: bool = True) -> LoadedModel:
    """Model ``path_or_id`` without its weights: the tokenizer and lmcoh's metadata (``model`` is
    None), enough to check that it can write a task. The same checks and errors as `load_model`."""
    source, local_only = _source(path_or_id, offline)
    with _one_line(path_or_id, local_only):
        with quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{path_or_id}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    path = Path(path_or_id).expanduser()
    meta = _read_meta(path) if path.is_dir() else {}
    return LoadedModel(None, tokenizer, meta, "cpu", str(path_or_id))


def _source(path_or_id: str, offline: bool) -> tuple[str, bool]:
    """What ``from_pretrained`` reads for ``path_or_id``, and whether only local files may be used."""
    path = cached_model_dir(path_or_id) or Path(path_or_id).expanduser()  # a GGUF file: its converted directory
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it holds a LoRA adapter: pass it as --adapter)" if (path / "adapter_config.json").exists() else ""
            raise ModelError(f"{path_or_id}: not a model directory (no config.json){hint}")
        _require_safetensors(path, "model")
        return str(path), True
    if path.exists() or _looks_like_path(path_or_id):
        raise ModelError(f"{path_or_id}: no such model directory")
    return path_or_id, offline or _env_offline()


@contextmanager
def _one_line(path_or_id: str, local_only: bool):
    """transformers' many error types while loading ``path_or_id``, as one `ModelError` line."""
    try:
        yield
    except ModelError:
        raise
    except Exception as err:
        if not Path(path_or_id).expanduser().exists():
            raise ModelError(f"{path_or_id}: not a local model directory, and not in the local Hugging Face "
                             f"cache{' (offline)' if local_only else ''}: {first_line(err)}") from None
        raise ModelError(f"{path_or_id}: cannot load model: {first_line(err)}") from None


def _attach_adapter(model, adapter: str, base_name: str, trainable: bool = False):
    from peft import PeftModel

    adir = Path(adapter).expanduser()
    if not (adir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    _require_safetensors(adir, "adapter")
    meta = _read_meta(adir)
    expected = meta.get("base_fingerprint")
    if expected is not None and expected != fingerprint(model):
        raise ModelError(f"{adapter}: adapter was trained on another base model than {base_name}")
    try:
        return PeftModel.from_pretrained(model, str(adir), is_trainable=trainable), meta
    except Exception as err:
        raise ModelError(f"{adapter}: adapter does not fit base model {base_name}: {first_line(err)}") from None


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "model.ckpt.index")


def _require_safetensors(path: Path, kind: str) -> None:
    """Refuse a directory whose weights are pickles: unpickling can run arbitrary code."""
    if any(path.glob("*.safetensors")):
        return
    pickles = [name for name in PICKLE_WEIGHTS if (path / name).exists()] or [p.name for p in path.glob("*.bin")]
    if pickles:
        raise ModelError(f"{path}: refusing to load {kind} weights stored as pickle ({pickles[0]}); lmcoh loads "
                         "safetensors only (convert with save_pretrained(..., safe_serialization=True))")
    raise ModelError(f"{path}: no {kind} weights (*.safetensors) in this directory")


def check_saved_model(path: str | Path) -> None:
    """`ModelError` unless ``path`` holds a model or adapter lmcoh saved whole: its config and
    safetensors weights that open (without loading them)."""
    from safetensors import safe_open

    path = Path(path)
    kind = "adapter" if (path / "adapter_config.json").is_file() else "model"
    if not (path / ("adapter_config.json" if kind == "adapter" else "config.json")).is_file():
        raise ModelError(f"{path}: damaged or missing (no adapter_config.json or config.json)")
    _require_safetensors(path, kind)
    for weights in path.glob("*.safetensors"):
        try:
            with safe_open(str(weights), framework="np") as f:
                list(f.keys())
        except Exception as err:  # safetensors raises its own error types for every kind of damage
            raise ModelError(f"{weights}: damaged ({first_line(err)})") from None


def fingerprint(model) -> str:
    """A short hash of the base model's input embeddings (LoRA leaves them untouched)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = base.get_input_embeddings().weight.detach()
    head = weight.flatten()[:65536].to("cpu", torch.float32).numpy()
    h = hashlib.sha256(f"{base.config.model_type}:{tuple(weight.shape)}".encode())
    h.update(head.tobytes())
    return h.hexdigest()[:16]


@contextmanager
def quiet_hf():
    """Hide transformers' per-file progress bars (loading and writing weights) for a moment."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ModelError(f"{path / META_FILE}: unreadable lmcoh metadata: {first_line(err)}") from None


def _looks_like_path(ref: str) -> bool:
    """A reference that cannot be a hub id (``name`` or ``org/name``)."""
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", ref) or ref.startswith((".", "~"))


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# ---- saving -------------------------------------------------------------------------------------------

def save_model(model, tokenizer, out_dir: str | Path, meta: dict) -> Path:
    """Write ``model`` (or just its adapter, for a peft model), tokenizer and ``lmcoh.json``.

    Atomic: everything goes to a temporary sibling directory that is renamed into place at the
    end. An existing ``out_dir`` is replaced only if it is empty or a model/adapter directory.
    """
    out = check_out_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = {**meta, "text_format": TEXT_FORMAT}
        if hasattr(model, "peft_config"):
            meta["base_fingerprint"] = fingerprint(model)
        with quiet_hf():
            model.save_pretrained(tmp)
            faults.point("save_model")
            tokenizer.save_pretrained(tmp)
        write_json(tmp / META_FILE, meta, indent=2)
        replace_dir(tmp, out)
    except OSError as err:
        raise ModelError(f"{out_dir}: cannot save model: {first_line(err)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; `ModelError` if it exists and is not an empty or model directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists()
                                               or (out / "adapter_config.json").exists())):
        raise ModelError(f"{out_dir}: exists and is not a model directory; refusing to overwrite it")
    return out


# ---- a model for a task -----------------------------------------------------------------------------

def model_layout(meta: dict, format: str | None = None, mode: str | None = None,
                 goal_text: str | None = None) -> Layout:
    """The layout a model is prompted in: the choices given, else its directory's own (lmcoh.json
    records the format, prompt mode and goal text it was trained with), else compact history
    prompts with the goal token."""
    return Layout(format or meta.get("format", "compact"), mode or meta.get("prompt_mode", "history"),
                  goal_text if goal_text is not None else meta.get("goal_text"))


def model_init_kwargs(model_args) -> dict:
    """``from_pretrained`` arguments from TRL's `ModelConfig` (dtype, attention, revision,
    quantization). Never ``trust_remote_code``."""
    from trl import get_quantization_config

    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    return kwargs


def check_task_fits(loaded: LoadedModel, task: Task, layout: Layout = Layout()) -> None:
    """`ModelError` unless the tokenizer can write every state, action and goal text of ``task``
    in ``layout``.

    A text fits when decoding its tokens gives it back (up to whitespace, which SentencePiece
    tokenizers insert after special tokens): a word-level tokenizer built for another task fails
    on the words it maps to ``<unk>``.
    """
    writer = Writer(task, layout, loaded.tokenizer)
    first = {}
    for t, layer in enumerate(task.layers):
        for s in layer.states.tolist():
            first.setdefault(s, t)
    texts = [writer.state(goal, s, t) for s, t in sorted(first.items()) for goal in ("success", "failure")]
    texts += [writer.action(a) for a in dict.fromkeys(range(task.n_actions))]
    tok = loaded.tokenizer
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    for text, back in zip(texts, tok.batch_decode(ids)):
        if "".join(back.split()) != "".join(text.split()):
            raise ModelError(f"the tokenizer of {loaded.path or 'the model'} cannot write {text.strip()!r} "
                             f"from task {task.name!r}; pretrain a model for this task (lmcoh pretrain)")


def check_layout(loaded: LoadedModel, task: Task, layout: Layout) -> None:
    """`check_task_fits`; a refusal ends with the formats this model can write the task in, if any."""
    try:
        check_task_fits(loaded, task, layout)
    except ModelError as err:
        others = [f for f in FORMATS if f != layout.format and _fits(loaded, task, replace(layout, format=f))]
        raise ModelError(f"{err}; use --format {' or '.join(others)}" if others else str(err)) from None


def _fits(loaded: LoadedModel, task: Task, layout: Layout) -> bool:
    try:
        check_task_fits(loaded, task, layout)
    except ModelError:
        return False
    return True


def open_for_task(ref: str, task: Task, *, adapter: str | None = None, format: str | None = None,
                  prompt: str | None = None, goal_text: str | None = None, weights: bool = True,
                  **load_kwargs) -> tuple[LoadedModel, Layout]:
    """Load model ``ref`` (and ``adapter``) for ``task``: the model, and the layout it is prompted
    in (the choices given, else its own), checked to write every text of the task. Without
    ``weights`` only the tokenizer is loaded: a cheap check before any work."""
    loaded = load_model(ref, adapter=adapter, **load_kwargs) if weights else load_tokenizer(ref)
    layout = model_layout(loaded.meta, format, prompt, goal_text)
    check_layout(loaded, task, layout)
    return loaded, layout
