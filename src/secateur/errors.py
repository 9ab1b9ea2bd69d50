"""User-facing errors.

Every error a user can cause (a wrong path, an unknown method, a bad recipe key, an
unsupported architecture) is a :class:`SecateurError` whose message is one line saying what is
wrong and what would be valid. The CLI prints that line and exits non-zero; anything else is a
bug and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SecateurError(ValueError):
    """A problem with the user's input; the message is meant to be shown as is."""


class ConfigError(SecateurError):
    """A recipe or step config is invalid; ``path`` names the offending field (``steps[1].sparsity``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class ArtifactError(SecateurError):
    """An artifact is missing, incomplete, truncated or was modified after it was written."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(choices: Iterable[str]) -> str:
    return ", ".join(repr(c) for c in sorted(choices))
