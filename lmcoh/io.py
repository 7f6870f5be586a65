"""Files: atomic writes and the one JSON convention.

JSON convention (every file lmcoh writes): infinities are the strings ``"inf"`` and
``"-inf"`` (an incoherence of +inf is a real answer, not an error), NaN is ``null``, numpy
scalars and arrays become plain numbers and lists. `number` reads a value back as a float.

Atomic writes go to a temporary sibling and are renamed into place, so a reader (or a run
resumed after a kill) sees the old file or the new one, never half of one; what lands gets the
user's umask. Nothing is lost: a command checks its output with `check_output` before any work,
and refuses to replace what is there unless told to (``--overwrite``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import LmcohError, first_line


def jsonable(x: Any) -> Any:
    """``x`` with lmcoh's JSON convention applied (see the module docstring)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return jsonable(x.tolist())
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return x


def dumps(x: Any, indent: int | None = None) -> str:
    return json.dumps(jsonable(x), allow_nan=False, indent=indent)


def number(x: Any) -> float:
    """A JSON value back as a float: ``"inf"`` -> inf, ``None`` -> nan."""
    return math.nan if x is None else float(x)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, unreadable or damaged file is an `LmcohError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LmcohError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LmcohError(f"{path}: damaged JSON ({first_line(err)})") from None


def read_jsonl(path: str | Path) -> list:
    """One JSON value per line; a damaged line is an `LmcohError` naming the file and line."""
    path = Path(path)
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise LmcohError(f"{path}, line {i}: damaged JSON ({first_line(err)})") from None
    return rows


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` for the block to write; when the block ends without an
    error it is synced and renamed onto ``path``, otherwise removed. The file gets the
    permissions a plain ``open`` would give it (mkstemp's are private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, x: Any, indent: int | None = None) -> Path:
    return write_text(path, dumps(x, indent) + "\n")


def write_jsonl(path: str | Path, rows: list) -> Path:
    return write_text(path, "".join(dumps(r) + "\n" for r in rows))


def replace_dir(src: str | Path, dest: str | Path) -> Path:
    """Move the finished directory ``src`` to ``dest``, replacing whatever ``dest`` held.

    The old ``dest`` is renamed aside first and deleted last, so a crash in between leaves
    the old directory aside (``.NAME.old.*``), never a mix of the two. What moves into place
    gets the permissions of plain ``mkdir`` and ``open`` (`plain_permissions`).
    """
    src, dest = Path(src), Path(dest)
    plain_permissions(src)
    if dest.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, aside / "old")
        os.replace(src, dest)
        shutil.rmtree(aside)
    else:
        os.replace(src, dest)
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_permissions(root: str | Path) -> None:
    """Give ``root`` and everything under it the permissions plain ``mkdir`` and ``open`` would,
    under the user's umask: temporary directories (mkdtemp) and some writers (safetensors
    weights) make them private, and on a shared machine nobody else could read the output."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


# ---- outputs --------------------------------------------------------------------------------------
def check_parent(path: str | Path, flag: str) -> Path:
    """``path`` as a Path; `LmcohError` if it cannot be created because an ancestor is a file."""
    path = Path(path).expanduser()
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LmcohError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return path


def check_output(path: str | Path, overwrite: bool, flag: str, kind: str = "directory") -> Path:
    """``path`` as a Path, refused (`LmcohError`, before any work) if it lies under a file, is not
    a ``kind`` ("directory" or "file"), or already holds something and ``overwrite`` is off: the
    line says what is there. An empty directory holds nothing."""
    path = check_parent(path, flag)
    if not path.exists():
        return path
    if kind == "directory" and not path.is_dir():
        raise LmcohError(f"{flag} {path} is a file, not a directory")
    if kind == "file" and path.is_dir():
        raise LmcohError(f"{flag} {path} is a directory, not a file")
    if overwrite:
        return path
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        if not names:
            return path
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        there = f"already holds {shown}"
    else:
        from .tasks.budget import human

        there = f"already exists ({human(path.stat().st_size)})"
    raise LmcohError(f"{flag} {path} {there}; pass --overwrite to replace it, or choose another {flag}")


@contextmanager
def exclusive(path: str | Path, what: str = "run"):
    """Hold the lock of directory ``path`` while the block runs: one run per directory.

    The lock is a sibling file ``.NAME.lock`` locked with `filelock` (an OS lock, so it dies
    with its process: a killed run leaves no stale lock) and holding the owner's pid. A second
    run on the same directory fails at once with an `LmcohError` naming that pid.
    """
    from filelock import FileLock, Timeout

    path = Path(path).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LmcohError(f"{path}: cannot create its directory ({first_line(err)})") from None
    lock_path = path.parent / f".{path.name}.lock"
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = lock_path.read_text().strip() or "unknown"
        except OSError:
            owner = "unknown"
        raise LmcohError(f"{path} is in use by another {what} (pid {owner}); wait for it to finish "
                         "or choose another directory") from None
    try:
        lock_path.write_text(f"{os.getpid()}\n")
        yield
    finally:
        lock.release()
