"""Errors a user can act on: the command line shows their text as one line (no traceback).

Lower layers raise these (or ``config.ConfigError`` / ``data.sources.DataError`` for bad
input); the text names the file, field or peer and what to do about it.
"""

from __future__ import annotations


class SplitfedError(Exception):
    """An error the user can act on; its text is the whole message."""


class CorruptFileError(SplitfedError):
    """A model, checkpoint, state or data file that is truncated, corrupted or of the wrong kind."""


class RefusedError(SplitfedError):
    """The server refused this device's credentials; redialing cannot help."""


class UnreachableError(SplitfedError):
    """The other end could not be reached (or the address could not be bound) within the time allowed."""
