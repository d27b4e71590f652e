"""The one exception type for expected failures: bad input, a busy target, a full disk.

The CLI prints its message on one line and exits non-zero without a traceback; anything
else that escapes is a bug and keeps its traceback.
"""


class ShadowMergeError(Exception):
    """An expected failure; the message says what is wrong and what to do."""


class NoUpdate(ShadowMergeError):
    """A graft whose update is zero, or below the output precision, in every grafted tensor: the output would be
    the Instruct again. Carries the counts, for train's own message."""

    def __init__(self, message: str, unchanged: int, identical: int):
        super().__init__(message)
        self.unchanged, self.identical = unchanged, identical


def first_line(exc: BaseException, limit: int | None = 200, empty: str | None = None) -> str:
    """The first line of an exception's message (at most `limit` characters), for a one-line error; for an empty
    message, `empty` (default: the exception's type name)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__ if empty is None else empty
    return lines[0][:limit] if limit is not None else lines[0]
