"""Exceptions that the CLI turns into one-line messages and exit codes.

Exit codes: 2 = error or bad input, 3 = could not assess (nothing scannable).
"""


class LmscanError(Exception):
    """An expected failure with a message fit for the user (exit 2)."""

    exit_code = 2


class InputError(LmscanError):
    """Bad user input: a missing path, an unreadable file, a bad option value."""


class UnsafeCheckpointError(LmscanError):
    """A checkpoint that lmscan refuses to load (e.g. a pickle with a code payload)."""


class CannotAssess(LmscanError):
    """The model was read but cannot be assessed (unsupported architecture, no usable site)."""

    exit_code = 3
