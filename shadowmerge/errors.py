"""The one exception type for expected failures: bad input, a busy target, a full disk.

The CLI prints its message on one line and exits non-zero without a traceback; anything
else that escapes is a bug and keeps its traceback.
"""


class ShadowMergeError(Exception):
    """An expected failure; the message says what is wrong and what to do."""
