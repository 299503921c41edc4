"""Atomic file output: a crash must never leave a half-written file that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` (whole) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_model_json(path: str | os.PathLike, what: str = "model config"):
    """A model directory's JSON file (config.json, labels.json, ...). Missing: "not a qdeep model
    directory"; unreadable or not JSON: one line naming it and why."""
    from qdeep.errors import QdeepError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QdeepError(f"{path.parent}: not a qdeep model directory (no {path.name})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QdeepError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from None


UNFINISHED = ".qdeep-unfinished"  # in OUT while a command writes its outputs there


@contextmanager
def outputs(out: str | os.PathLike) -> Iterator[Path]:
    """Write a command's outputs into `out`: OUT/.qdeep-unfinished is there from the first output to
    the last (metrics.json) and goes only when the block succeeds, so outputs that a kill, a power
    cut or an error interrupted never look complete (`unfinished` says so to predict and compare)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / UNFINISHED
    write_json(marker, {"pid": os.getpid()})
    yield out
    marker.unlink()


def unfinished(out: str | os.PathLike) -> str | None:
    """Why the outputs in `out` are not those of a finished command, or None if they are."""
    out = Path(out)
    if (out / UNFINISHED).exists():
        return (f"{out} holds the outputs of a command that did not finish (it was stopped or failed while writing "
                f"them: {out / UNFINISHED} is there); rerun it")
    if not (out / "metrics.json").is_file():
        return f"{out}: no metrics.json (is it the output of a finished qdeep baseline or train?)"
    return None
