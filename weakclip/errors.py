"""One error type for bad user input: the CLI prints its message as one line, never a traceback."""

from __future__ import annotations


class WeakclipError(Exception):
    """Bad input or environment, with a message that names the file (or key) and the problem."""
