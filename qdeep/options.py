"""The CLI's option types: each refuses a bad value in one line saying what is allowed, before
Ray starts or any image is read (argparse calls them while parsing). `parse_freeze` and
`worker_range` read the same values for the library (a sweep file, a workflow's arguments)."""

from __future__ import annotations

import argparse
import math
import re
import sys

from qdeep.errors import QdeepError


class ArgumentError(SystemExit):
    """A bad command line: argparse's message, already printed as one `qdeep: error:` line; exit 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line: `qdeep: error: --folds '1': expected an integer >= 2
    (see `qdeep baseline --help`)`, exit 2; no usage block."""

    def error(self, message: str):
        match = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match:
            option, rest = match.group(1).split("/")[-1], match.group(2)
            message = f"{option} {rest}" if rest.startswith("'") else f"{option}: {rest}"
        message = f"{message} (see '{self.prog} --help')"
        print(f"qdeep: error: {message}", file=sys.stderr)
        raise ArgumentError(message)


def _bad(text, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text!r}: expected {expected}")


def _number(convert, expected: str, allowed):
    """An argparse type: `convert(text)` if `allowed(value)`, else one line saying what is `expected`."""

    def parse(text: str):
        try:
            value = convert(str(text).strip())
        except ValueError:
            raise _bad(text, expected) from None
        if not allowed(value):
            raise _bad(text, expected)
        return value

    return parse


def int_range(lo: int, hi: int | None = None, unit: str = ""):
    """An integer from lo to hi (no upper end when None)."""
    expected = (f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}") + unit
    return _number(int, expected, lambda v: lo <= v and (hi is None or v <= hi))


def float_range(expected: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """A finite number from lo to hi, each end open or closed."""
    return _number(float, expected, lambda v: math.isfinite(v) and lo <= v <= hi
                   and not (lo_open and v == lo) and not (hi_open and v == hi))


positive_int = int_range(1)
non_negative_int = int_range(0)
seed_int = int_range(0, 2**32 - 1)
positive_float = float_range("a number > 0", 0, lo_open=True)
non_negative_float = float_range("a number >= 0", 0)
fraction = float_range("a fraction strictly between 0 and 1", 0, 1, lo_open=True, hi_open=True)
fraction_closed = float_range("a fraction from 0 to 1", 0, 1)
crop_fraction = float_range("a fraction from 0 up to (not including) 1", 0, 1, hi_open=True)
image_size = int_range(1, unit=" (pixels)")
learning_rate = float_range("a learning rate > 0", 0, lo_open=True)

FREEZE_EXPECTED = "head, none or last:N with N >= 1"
FREEZE_HELP = "head (only the new head trains), last:N (head + last N blocks, N >= 1) or none (everything trains)"


def parse_freeze(freeze: str) -> tuple[str, int]:
    """``"head"`` -> ("head", 0), ``"last:N"`` -> ("last", N), ``"none"`` -> ("none", 0)."""
    text = str(freeze).strip().lower()
    if text in ("head", "none"):
        return text, 0
    kind, sep, count = text.partition(":")
    digits = count.strip().removeprefix("+")
    if kind == "last" and sep and digits.isdecimal() and int(digits) >= 1:
        return "last", int(digits)
    raise QdeepError(f"bad freeze value {freeze!r}: expected {FREEZE_HELP}")


def freeze_spec(text: str) -> str:
    """head | none | last:N (N >= 1), as `parse_freeze` reads it; kept as given."""
    try:
        parse_freeze(text)
    except QdeepError:
        raise _bad(text, FREEZE_EXPECTED) from None
    return text


def worker_range(workers: int | str | tuple[int, int]) -> tuple[int, int]:
    """`N`, `"N"`, `"MIN-MAX"` or `(MIN, MAX)` as (MIN, MAX). MIN < MAX is elastic: Ray Train starts
    with as many workers as the cluster's nodes hold (at least MIN) and grows towards MAX as nodes join."""
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
    try:
        worker_range(text)
    except QdeepError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--workers ")) from None
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
