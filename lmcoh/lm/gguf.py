"""GGUF files as models: a ``.gguf`` file, or a directory holding one, is a model like any other.

transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``) by dequantising every tensor,
which takes 40-80 s for a 135M-parameter model on two CPU cores. So the first use converts the
file once: the dequantised model (float32) and its tokenizer (with the chat template the file
carries) are saved as a plain safetensors directory under ``$LMCOH_CACHE/gguf/`` (default
``~/.cache/lmcoh``), keyed by the SHA-256 of the file's content (its ``lmcoh.json`` names the
file under ``gguf``), and every later use loads that directory, as fast as any local model. A
renamed or copied file finds the same entry; a changed file gets a new one.

The file's header is checked before anything is converted, so a file that is not GGUF, or one that
was truncated (a download cut short), is one line naming it, in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import sys
from pathlib import Path

from ..errors import ModelError, first_line

MAGIC = b"GGUF"


def cache_root() -> Path:
    return Path(os.environ.get("LMCOH_CACHE", "~/.cache/lmcoh")).expanduser() / "gguf"


def gguf_file(ref: str) -> Path | None:
    """The GGUF file ``ref`` names: ``ref`` itself, or the one ``*.gguf`` file of a directory that
    is not a Hugging Face model directory (no ``config.json``); None if ``ref`` names neither.
    `ModelError` for a file that is not GGUF (a model is a directory or a GGUF file) and for a
    directory holding several."""
    path = Path(ref).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ModelError(f"{ref}: not a GGUF file (a model is a model directory or a .gguf file)")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ModelError(f"{ref}: holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}); "
                             "name the one to load")
        return found[0] if found else None
    return None


def cached_model_dir(ref: str) -> Path | None:
    """The safetensors directory of the model in GGUF file ``ref`` (see `gguf_file`), converted
    on first use; None if ``ref`` names no GGUF file."""
    from filelock import FileLock

    path = gguf_file(ref)
    if path is None:
        return None
    header = check_header(path)
    out = cache_root() / content_hash(path)
    if _converted(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out.parent / f".{out.name}.lock"))
        lock.acquire()  # two processes converting the same file: one waits
    except OSError as err:
        raise ModelError(f"{out.parent}: cannot write the cache of converted GGUF models ({first_line(err)}); "
                         "set LMCOH_CACHE to a writable directory") from None
    try:
        if not _converted(out):  # (another process may have converted it while this one waited)
            shutil.rmtree(out, ignore_errors=True)  # a damaged entry; processes using it keep their open files
            parameters = sum(math.prod(t.shape) for t in header.tensors)
            print(f"lmcoh: {path}: {parameters / 1e6:,.1f}M parameters, converting them to safetensors once "
                  f"(about {seconds_to_convert(parameters):.0f} s); cached in {out}", file=sys.stderr, flush=True)
            convert(path, out)
    finally:
        lock.release()
    return out


def _converted(out: Path) -> bool:
    from .loading import check_saved_model

    try:
        check_saved_model(out)
    except ModelError:
        return False
    return True


def seconds_to_convert(parameters: int) -> float:
    """A rough time for `convert` on two CPU cores: measured 40-80 s for SmolLM2-135M (Q4_1),
    most of it transformers reading the metadata and dequantising, so about 0.45 s per million."""
    return max(5.0, round(0.45 * parameters / 1e6, -1))


def content_hash(path: Path) -> str:
    """The SHA-256 of ``path``'s content (hashed once per process while its size and time stay)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_header(path: Path):
    """``path``'s GGUF header (transformers' `GgufHeader`); `ModelError` unless it parses and every
    tensor it lists lies within the file."""
    from transformers.integrations.gguf import GgufHeader

    try:
        header = GgufHeader.from_file(str(path))
    except Exception as err:  # struct, unicode and value errors: every kind of damage reads differently
        raise ModelError(f"{path}: cannot read its GGUF header, so the file is damaged or of a kind transformers "
                         f"cannot read ({first_line(err)})") from None
    size = path.stat().st_size
    end = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=header.data_start)
    if end > size:
        raise ModelError(f"{path}: truncated GGUF file ({size:,} bytes of the {end:,} its header lists); "
                         "download it again")
    return header


def convert(path: Path, out: Path) -> Path:
    """Dequantise the GGUF model ``path`` with transformers and save it, with its tokenizer, to
    ``out`` (atomically, `save_model`), its ``lmcoh.json`` naming the file under ``gguf``. Never
    runs remote code."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .loading import save_model

    source = dict(gguf_file=path.name, local_files_only=True, trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **source)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **source, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as err:  # transformers raises many types; the user needs one line
        raise ModelError(f"{path}: cannot load this GGUF model with transformers: {first_line(err)}") from None
    # saved as the plain dense model it now is, not as the quantized GGUF it was read from
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_model(model, tokenizer, out, {"gguf": {"file": str(path.resolve()), "sha256": out.name,
                                                       "transformers": transformers.__version__}})
