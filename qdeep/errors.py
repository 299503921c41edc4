"""One exception type for user-facing failures, so the CLI can print them as one line."""


class QdeepError(Exception):
    """A problem with the user's input or setup; its message is the whole story."""


class BadInputError(QdeepError):
    """A file or CSV line that qdeep cannot use; the message names the file (and line)."""
