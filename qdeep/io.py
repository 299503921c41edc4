"""Files: atomic output (a crash never leaves a half-written file that looks complete), JSON on a
local path or any URI pyarrow opens (s3://, gs://, ...), model directories' JSON, unfinished outputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from qdeep.errors import QdeepError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it replaces `path` only if the block succeeds. For a URI
    (s3://...), a local temporary file, uploaded whole when the block succeeds (an object store
    writes whole objects: readers see the old object or the new one)."""
    if "://" in str(path):
        with tempfile.TemporaryDirectory(prefix="qdeep-upload-") as d:
            tmp = Path(d) / str(path).rsplit("/", 1)[-1]
            yield tmp
            fs, inner = filesystem(path)
            fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(inner) as out:
                out.write(tmp.read_bytes())
        return
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


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence], end: str = "\n") -> None:
    """A UTF-8 CSV with `header`, its lines ending in `end`, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator=end)
        writer.writerow(header)
        writer.writerows(rows)


def is_uri(path) -> bool:
    """A URI whose filesystem every node reaches by name (s3://, gs://, hdfs://, ...); `file://` is
    a local path like any other."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.lower() != "file"


def child(directory: str | os.PathLike, name: str) -> str:
    """`name` inside `directory`, a local path or a URI (Path would turn s3://b into s3:/b)."""
    return f"{str(directory).rstrip('/')}/{name}"


def basename(path: str | os.PathLike) -> str:
    """The last part of a local path or a URI (s3://b/runs/base -> base)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str | os.PathLike) -> str | Path:
    """The folder holding `path`: a URI's prefix (s3://b/out/model -> s3://b/out), or a local Path."""
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_uri(path) else Path(path).parent


def filesystem(path: str | os.PathLike):
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow handles."""
    import pyarrow.fs

    if "://" in str(path):
        return pyarrow.fs.FileSystem.from_uri(str(path))
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as JSON at `path` (local or a URI), written atomically (`atomic_path`)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text file at `path` (local or URI)."""
    return read_bytes(path).decode("utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file at `path` (local or URI), whole."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def remove_dir(path: str | os.PathLike) -> None:
    """The folder (or a URI's prefix) at `path` and everything in it; nothing if there is none."""
    import pyarrow.fs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(inner)
    elif is_uri(path):  # an object store's prefix may hold objects without a directory marker
        fs.delete_dir_contents(inner, missing_dir_ok=True)


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON file at `path` (local or URI), or None if there is none."""
    import pyarrow.fs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return json.loads(f.read())


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


def claim_run(path: str | os.PathLike, settings: dict, refusal: str, option: str) -> dict:
    """Rerunning a run resumes it, so it must be the same run. `path` (local or URI) holds the record
    the run's first launch wrote with `record_run`: its settings and the ids to resume by (its MLflow
    run). Returns that record ({} before the first launch); a launch with other settings is refused,
    `refusal` naming the run and the changed settings listed."""
    recorded = read_json(path) or {}
    old = recorded.get("settings", {})
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k)) if recorded else []
    if changed:
        raise QdeepError(f"{refusal} ({', '.join(changed)}); rerun with those settings to resume, "
                         f"or use another {option}")
    return recorded


def record_run(path: str | os.PathLike, settings: dict, **ids) -> None:
    """What `claim_run` reads back: the settings, and ids such as `mlflow_run_id`."""
    write_json(path, {"settings": settings, **ids})


def read_model_json(path: str | os.PathLike, what: str = "model config"):
    """A model directory's JSON file (config.json, labels.json, ...). Missing: "not a qdeep model
    directory"; unreadable or not JSON: one line naming it and why."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QdeepError(f"{path.parent}: not a qdeep model directory (no {path.name})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QdeepError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from None


UNFINISHED = ".qdeep-unfinished"  # in OUT while a command writes its outputs there


def resolved(out: str | os.PathLike) -> str | Path:
    """A command's OUT: a URI as it is, a local path made absolute."""
    return str(out) if is_uri(out) else Path(out).resolve()


@contextmanager
def outputs(out: str | os.PathLike) -> Iterator[Path]:
    """Write a command's outputs into `out`: OUT/.qdeep-unfinished is there from the first output to
    the last (metrics.json) and goes only when the block succeeds, so outputs that a kill, a power
    cut or an error interrupted never look complete (`unfinished` says so to predict and compare).
    Yields the folder to write into: `out`, or for a URI (s3://...) a local temporary one whose
    files are uploaded into `out` when the block succeeds (each folder in it replacing its old
    copy there, metrics.json last)."""
    marker = child(out, UNFINISHED)
    if is_uri(out):
        write_json(marker, {"pid": os.getpid()})
        with tempfile.TemporaryDirectory(prefix="qdeep-out-") as d:
            yield Path(d)
            upload_dir(Path(d), str(out))
        fs, inner = filesystem(marker)
        fs.delete_file(inner)
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"pid": os.getpid()})
    yield out
    Path(marker).unlink()


def upload_dir(local: Path, uri: str) -> None:
    """Every file under `local` into `uri` at the same relative path, metrics.json last; a folder
    of `local` first empties its namesake at `uri` (no file of an older output stays in OUT/model)."""
    fs, inner = filesystem(uri)
    for sub in sorted(p for p in local.iterdir() if p.is_dir()):
        fs.delete_dir_contents(f"{inner}/{sub.name}", missing_dir_ok=True)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == "metrics.json", str(p)))
    for path in files:
        target = f"{inner}/{path.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(target) as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 22)


@contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """A folder as a local path: itself, or for a URI a temporary local copy of it (e.g. `qdeep
    predict --model s3://.../model`), gone after the block."""
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="qdeep-copy-") as d:
        fs, inner = filesystem(path)
        pyarrow.fs.copy_files(inner, d, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield Path(d)


def exists(path: str | os.PathLike) -> bool:
    """Whether a file is at `path` (local or a URI)."""
    import pyarrow.fs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pyarrow.fs.FileType.File


def unfinished(out: str | os.PathLike) -> str | None:
    """Why the outputs in `out` (a folder or a URI) are not those of a finished command, or None if they are."""
    if exists(child(out, UNFINISHED)):
        return (f"{out} holds the outputs of a command that did not finish (it was stopped or failed while writing "
                f"them: {child(out, UNFINISHED)} is there); rerun it")
    if not exists(child(out, "metrics.json")):
        return f"{out}: no metrics.json (is it the output of a finished qdeep baseline or train?)"
    return None
