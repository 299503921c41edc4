"""One exception type for user-facing failures, so the CLI can print them as one line."""


class QdeepError(Exception):
    """A problem with the user's input or setup; its message is the whole story."""


class BadInputError(QdeepError):
    """A file or CSV line that qdeep cannot use; the message names the file (and line)."""


def one_line(exc: BaseException) -> str:
    """The line that says what went wrong. Ray wraps a worker's exception in a multi-line report
    whose first line is only "Training failed due to worker errors:"; the cause is its last
    `SomeError: message` line."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): \S", line)]
    return causes[-1] if causes else f"{type(exc).__name__}: {lines[0] if lines else ''}"
