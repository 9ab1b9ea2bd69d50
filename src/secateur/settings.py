"""Settings read from the environment, never hard-coded paths.

``SECATEUR_DATA_DIR``   folder holding named datasets (``tinystories/``, ``wikitext2/``, ``c4/``,
                        ``stsb/``); unset means "use the Hugging Face hub" where that is possible.
``SECATEUR_PROGRESS``   ``0`` hides progress bars, ``1`` forces them; by default they show on a terminal.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    value = os.environ.get("SECATEUR_DATA_DIR")
    return Path(value).expanduser() if value else None


def show_progress() -> bool:
    """Progress bars are drawn on an interactive stderr unless ``SECATEUR_PROGRESS=0``
    (``SECATEUR_PROGRESS=1`` forces them on, e.g. under a pager-less log viewer)."""
    import sys

    value = os.environ.get("SECATEUR_PROGRESS", "")
    if value in ("0", "false", "no"):
        return False
    return value in ("1", "true", "yes") or sys.stderr.isatty()
