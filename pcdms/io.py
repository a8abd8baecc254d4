"""Small file helpers shared by every writer: atomic writes and content hashes.

Long jobs write each output through :func:`atomic_path` (temp file in the same
folder + ``os.replace``), so a kill leaves either the old file or the new one,
never a truncated one; a re-run then skips what exists.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence


# Read once, at import (before any thread runs): os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` defaults to the target's own suffix so writers that infer the
    format from the extension (PIL, torch, safetensors) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.tmp.", suffix=suffix if suffix is not None else path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give the result the mode a plain open() would
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # Writers (PIL, torch) raise ENOSPC & co. without a file name: name the file being written.
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (checkpoint identity in manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_folder(path: str | os.PathLike, exclude: Sequence[str] = ()) -> str:
    """SHA-256 over the sorted relative names and bytes of every file under ``path``, except those
    whose relative POSIX path matches one of the ``exclude`` patterns (``fnmatch``: ``*`` crosses ``/``)."""
    root = Path(path)
    h = hashlib.sha256()
    keep = lambda q: not any(fnmatch.fnmatchcase(q.relative_to(root).as_posix(), pat) for pat in exclude)  # noqa: E731
    for p in sorted(q for q in root.rglob("*") if q.is_file() and keep(q)):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a JSON file holding an object; malformed content is a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def launcher_rank() -> int:
    """This process's rank as torchrun / ``accelerate launch`` set it (``RANK``; 0 when not launched so).
    Read before any process group exists, to let one process print and write."""
    return int(os.environ.get("RANK", "0"))


class FolderBusyError(ValueError):
    """Another process is writing the same output folder (a ValueError: commands report those in one line)."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold a lock on ``folder`` (an OS file lock on ``.<name>.lock`` beside it, via the ``filelock``
    package) while a step writes it; under torchrun only process 0 (``RANK``) takes it.

    Two runs into one folder at once would interleave checkpoints and manifests and both report
    success; the second one fails here instead. The lock sits beside the folder, so taking it
    creates nothing inside (a run that fails early leaves no folder), and it goes with the process
    (a kill frees it). Raises :class:`FolderBusyError` naming the folder.
    """
    from filelock import FileLock, Timeout

    if launcher_rank() != 0:
        yield
        return
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderBusyError(f"{folder} is being written by another reid-aug process (it holds {path}); "
                              "wait for it, or choose another output folder") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting process would have failed, not queued
        lock.release()


def locked_output(param: str = "out_dir"):
    """Decorator: run the function holding :func:`folder_lock` on its argument ``param`` (an output
    folder); a call with ``dry_run=True`` writes nothing and takes no lock."""
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if bound.arguments.get("dry_run"):
                return fn(*args, **kwargs)
            with folder_lock(bound.arguments[param]):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def read_torch_file(path: str | os.PathLike, expected: str, trust_pickle: bool = False) -> Any:
    """``torch.load`` a weights file on CPU (``weights_only=True`` unless ``trust_pickle``).

    ``expected`` says what the file should be (e.g. "torchvision's AlexNet weights"); it ends
    every error. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file
    that is not a PyTorch checkpoint, a damaged one, or one the safe loader refuses.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (expected {expected})")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (PK..); the legacy format starts with a pickle protocol opcode (0x80).
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle); "
                         f"expected {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except (RuntimeError, EOFError) as err:  # a damaged archive
        raise ValueError(f"{path}: unreadable PyTorch checkpoint ({str(err).splitlines()[0]}); a truncated "
                         "download?") from None
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: the safe loader (weights_only=True) refused it ({str(err).splitlines()[0]}); "
            "if you trust the file, load it with trust_pickle=True (CLI: --trust-pickle)"
        ) from None
