"""Settings read from the environment, never hard-coded paths.

``SECATEUR_DATA_DIR``   folder holding named datasets (``tinystories/``, ``wikitext2/``, ``c4/``,
                        ``stsb/``); unset means "use the Hugging Face hub" where that is possible.
``SECATEUR_HOME``       secateur's own folder: the registry database (``registry.db``) and its artifact
                        store (``objects/``); default ``$XDG_DATA_HOME/secateur``, else
                        ``~/.local/share/secateur``.
``SECATEUR_MLFLOW_URI`` an MLflow tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``): every registry
                        write is mirrored there (extra ``mlflow``); unset: no mirror.
``SECATEUR_PROGRESS``   ``0`` hides progress, ``1`` forces bars; by default bars show on a terminal and,
                        elsewhere (a log, CI), a line with the stage, percent and ETA every
                        ``SECATEUR_PROGRESS_EVERY`` seconds (default 30) of a long loop.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    value = os.environ.get("SECATEUR_DATA_DIR")
    return Path(value).expanduser() if value else None


def home() -> Path:
    """secateur's home folder (``SECATEUR_HOME``; default: the user's data directory), where the
    registry keeps its database and artifact store. Not created here."""
    value = os.environ.get("SECATEUR_HOME")
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "secateur"


def mlflow_uri() -> str | None:
    """The MLflow tracking URI the registry mirrors into (``SECATEUR_MLFLOW_URI``), or None."""
    return os.environ.get("SECATEUR_MLFLOW_URI") or None


def progress_mode() -> str:
    """``"bar"`` (a terminal, or ``SECATEUR_PROGRESS=1``), ``"lines"`` (stderr is not a terminal:
    periodic plain lines), or ``"off"`` (``SECATEUR_PROGRESS=0``)."""
    import sys

    value = os.environ.get("SECATEUR_PROGRESS", "")
    if value in ("0", "false", "no"):
        return "off"
    return "bar" if value in ("1", "true", "yes") or sys.stderr.isatty() else "lines"


def progress_every() -> float:
    """Seconds between two progress lines when stderr is not a terminal (``SECATEUR_PROGRESS_EVERY``)."""
    try:
        return max(0.0, float(os.environ.get("SECATEUR_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def show_progress() -> bool:
    """Progress bars are drawn on an interactive stderr unless ``SECATEUR_PROGRESS=0``
    (``SECATEUR_PROGRESS=1`` forces them on, e.g. under a pager-less log viewer)."""
    import sys

    value = os.environ.get("SECATEUR_PROGRESS", "")
    if value in ("0", "false", "no"):
        return False
    return value in ("1", "true", "yes") or sys.stderr.isatty()
