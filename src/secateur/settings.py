"""Settings read from the environment, never hard-coded paths.

``SECATEUR_DATA_DIR``   folder holding named datasets (``tinystories/``, ``wikitext2/``, ``c4/``,
                        ``stsb/``); unset means "use the Hugging Face hub" where that is possible.
``SECATEUR_PROGRESS``   ``0`` hides progress bars.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    value = os.environ.get("SECATEUR_DATA_DIR")
    return Path(value).expanduser() if value else None


def show_progress() -> bool:
    return os.environ.get("SECATEUR_PROGRESS", "1") not in ("0", "false", "no")
