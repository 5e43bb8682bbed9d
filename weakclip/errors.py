"""One error type for bad user input: the CLI prints its message as one line, never a traceback; and
one-line warnings for settings that run but weaken the result."""

from __future__ import annotations

import sys


class WeakclipError(Exception):
    """Bad input or environment, with a message that names the file (or key) and the problem."""


def warn(message: str) -> None:
    """Print ``weakclip: warning: <message>`` on stderr (the run's log)."""
    print(f"weakclip: warning: {message}", file=sys.stderr, flush=True)
