"""The CLI's option types: each refuses a bad value in one line saying what is allowed, before
Ray starts or any image is read (argparse calls them while parsing)."""

from __future__ import annotations

import argparse
import sys


class ArgumentError(SystemExit):
    """A bad command line: argparse's message, already printed as one `qdeep: error:` line; exit 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line: `qdeep: error: --folds '1': expected an integer >= 2
    (see `qdeep baseline --help`)`, exit 2; no usage block."""

    def error(self, message: str):
        import re

        match = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match:
            option, rest = match.group(1).split("/")[-1], match.group(2)
            message = f"{option} {rest}" if rest.startswith("'") else f"{option}: {rest}"
        message = f"{message} (see '{self.prog} --help')"
        print(f"qdeep: error: {message}", file=sys.stderr)
        raise ArgumentError(message)


def _bad(text, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r}: expected {expected}")


def int_range(lo: int | None = None, hi: int | None = None, unit: str = ""):
    """An argparse type: an integer in [lo, hi] (either end open when None)."""
    if hi is None:
        expected = f"an integer >= {lo}" if lo is not None else "an integer"
    else:
        expected = f"an integer from {lo} to {hi}"
    expected += unit

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise _bad(text, expected) from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _bad(text, expected)
        return value

    parse.__name__ = f"int_range({lo}, {hi})"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
                expected: str | None = None):
    """An argparse type: a finite number within lo..hi, each end open or closed."""
    if expected is None:
        if hi is None:
            expected = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        import math

        try:
            value = float(str(text).strip())
        except ValueError:
            raise _bad(text, expected) from None
        if not math.isfinite(value):
            raise _bad(text, expected)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise _bad(text, expected)
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise _bad(text, expected)
        return value

    parse.__name__ = f"float_range({lo}, {hi})"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)
seed_int = int_range(0, 2**32 - 1)
positive_float = float_range(0, lo_open=True)
non_negative_float = float_range(0)
fraction = float_range(0, 1, lo_open=True, hi_open=True, expected="a fraction strictly between 0 and 1")
fraction_closed = float_range(0, 1, expected="a fraction from 0 to 1")
crop_fraction = float_range(0, 1, hi_open=True, expected="a fraction from 0 up to (not including) 1")
image_size = int_range(1, unit=" (pixels)")
learning_rate = float_range(0, lo_open=True, expected="a learning rate > 0")

FREEZE_EXPECTED = "head, none or last:N with N >= 1"


def freeze_spec(text: str) -> str:
    """head | none | last:N (N >= 1), as `qdeep.models.parse_freeze` reads it (checked here without torch)."""
    import re

    t = str(text).strip().lower()
    if t in ("head", "none") or (re.fullmatch(r"last:\s*\+?\d+\s*", t) and int(t.partition(":")[2]) >= 1):
        return text
    raise _bad(text, FREEZE_EXPECTED)


def worker_range(workers: int | str | tuple[int, int]) -> tuple[int, int]:
    """`N`, `"N"`, `"MIN-MAX"` or `(MIN, MAX)` as (MIN, MAX). MIN < MAX is elastic: Ray Train starts
    with as many workers as the cluster's nodes hold (at least MIN) and grows towards MAX as nodes join."""
    from qdeep.errors import QdeepError

    if isinstance(workers, tuple):
        lo, hi = workers
    else:
        text = str(workers).strip()
        lo_text, sep, hi_text = text.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text if sep else lo_text)
        except ValueError:
            raise QdeepError(f"--workers {text!r}: expected N or MIN-MAX, e.g. 2 or 1-4") from None
    if not 1 <= lo <= hi:
        raise QdeepError(f"--workers {workers!r}: need 1 <= MIN <= MAX, e.g. 2 or 1-4")
    return lo, hi


def workers_spec(text: str) -> str:
    """N or MIN-MAX, as `worker_range` reads it; kept as given."""
    from qdeep.errors import QdeepError

    try:
        worker_range(text)
    except QdeepError as exc:
        message = str(exc)
        raise argparse.ArgumentTypeError(message.removeprefix("--workers ")) from None
    return text


def run_name(text: str) -> str:
    """A run name is a folder under the storage path: no path separators, not '.' or '..'."""
    if not text.strip() or "/" in text or "\\" in text or text.strip() in (".", ".."):
        raise _bad(text, "a name without '/' (it becomes a folder under the storage path)")
    return text


def encoding_name(text: str) -> str:
    import codecs

    try:
        codecs.lookup(text)
    except LookupError:
        raise _bad(text, "a Python codec name, e.g. utf-8, latin-1, cp1252") from None
    return text


def csv_list(kind, what: str = "values"):
    """A comma-separated list of `kind`, at least one."""

    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
        if not values:
            raise _bad(text, f"a comma-separated list of {what}")
        return values

    parse.__name__ = f"list of {what}"
    return parse


def add_fields(parser, config, names, **overrides) -> None:
    """One `--field-name` option (dest: the field's name) for each dataclass field in `names`, its
    default the value in `config` (an instance), its type, choices and help from the field's
    metadata; `overrides[name]` replaces any of those (a `flag` too) for one command."""
    for name in names:
        meta = {**config.__dataclass_fields__[name].metadata, **overrides.get(name, {})}
        default = getattr(config, name)
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        text = meta["help"] if default is None or default is False or "(default" in meta["help"] else \
            f"{meta['help']} (default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action="store_true", help=text)
            continue
        metavar = meta.get("metavar") or (None if meta.get("choices") else flag[2:].upper().replace("-", "_"))
        parser.add_argument(flag, dest=name, default=default, type=meta.get("type"), choices=meta.get("choices"),
                            metavar=metavar, help=text)
