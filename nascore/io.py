"""Atomic writes and safe checkpoint loading.

Every output nascore writes goes to a temporary file in the destination folder, is flushed and
fsync'ed, then renamed over the destination: a kill mid-write leaves the previous good file.
Checkpoints load with `torch.load(weights_only=True)` (no code runs from a file) and are checked
against the schema the caller expects (kind, method, space) before use.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

CHECKPOINT_FORMAT = 1


def _file_mode() -> int:
    """The mode a plain `open(..., "w")` would give: 0o666 less the process umask.

    mkstemp creates 0o600 files; outputs shared through a DVC cache or remote must be readable.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class OutputError(OSError):
    """An output could not be written (disk full, no permission); nothing partial was left."""


class CheckpointError(ValueError):
    """A checkpoint that is truncated, not a nascore checkpoint, or from another run's setup."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(e.errno or errno.EIO,
                          f"cannot write {path}: {e.strerror or e} (is the folder writable?)") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _file_mode())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for this file system or limit (disk full?)"}.get(
                    e.errno, e.strerror or str(e))
        raise OutputError(e.errno or errno.EIO, f"cannot write {path}: {what}; "
                          f"nothing was written there") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save `obj` atomically. It is serialised in memory first: torch.save reports a full
    disk as an opaque RuntimeError ("iostream error"), a plain file write as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def save_checkpoint(path: str | Path, payload: Mapping[str, Any], *, kind: str,
                    meta: Mapping[str, Any]) -> None:
    """Save `payload` (tensors, numbers, strings, lists, dicts only) with a schema header."""
    data = {"nascore_checkpoint": CHECKPOINT_FORMAT, "kind": kind, "meta": dict(meta), **payload}
    save_torch(path, data)


def checkpoint_progress(ckpt: Mapping[str, Any], path: str | Path, max_epochs: int
                        ) -> tuple[int, list[dict[str, Any]]]:
    """The (epoch, history) a checkpoint resumes from, checked: an epoch in [0, max_epochs] with
    one history record per epoch. A damaged or hand-edited file is refused, not trusted."""
    epoch, history = ckpt.get("epoch"), ckpt.get("history")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= max_epochs:
        raise CheckpointError(f"{path}: epoch {epoch!r} is not a whole number in [0, {max_epochs}]; "
                              f"the file is damaged: delete it to start afresh")
    if not isinstance(history, list) or len(history) != epoch or \
            not all(isinstance(r, dict) for r in history):
        got = f"{len(history)} records" if isinstance(history, list) else type(history).__name__
        raise CheckpointError(f"{path}: history holds {got} for epoch {epoch} (one record per epoch "
                              f"expected); the file is damaged: delete it to start afresh")
    return epoch, list(history)


def load_checkpoint(path: str | Path, *, kind: str, meta: Mapping[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, refusing anything else.

    `meta` entries must match what the checkpoint recorded (e.g. method and space), so a checkpoint
    from another setup is rejected rather than half-loaded.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code
        raise CheckpointError(f"checkpoint {path} holds Python objects beyond tensors and plain data; "
                              f"nascore never loads such a file (it could run code): delete it to start "
                              f"afresh") from None
    except Exception as e:   # truncated zip, garbage
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); delete it "
                              f"to start afresh") from None
    if not isinstance(data, dict) or data.get("nascore_checkpoint") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a nascore checkpoint (format {CHECKPOINT_FORMAT})")
    if data.get("kind") != kind:
        raise CheckpointError(f"{path} is a {data.get('kind')!r} checkpoint, expected {kind!r}")
    for key, want in (meta or {}).items():
        got = data.get("meta", {}).get(key)
        if got != want:
            raise CheckpointError(f"{path} was written for {key}={got!r}, this run has {key}={want!r}; "
                                  f"delete it or point the run at its own checkpoint folder")
    return data
