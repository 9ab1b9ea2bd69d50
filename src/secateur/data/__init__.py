"""The data room: text sources, calibration sets and fingerprints.

    from secateur.data import source, calibration_set

    src = source("tinystories")                    # or "wikitext2", "c4", "stsb", or a file path
    src.texts("evaluation")                        # list[str]
    calib = calibration_set(src, tokenizer)        # 128 x 256 consecutive windows (P1)
    calib = calibration_set("c4", tokenizer, mode="random", seq_len=2048)   # GPTQ convention (P3)
    calib.input_ids, calib.fingerprint, calib.settings

Named datasets live under ``SECATEUR_DATA_DIR`` (see ``secateur.settings``); files may be
``.txt`` (blank-line paragraphs), ``.jsonl`` (a ``text`` field or ``field=``), ``.csv``/``.tsv``
(a header row and a column, ``text`` or ``field=``) or ``.parquet`` (needs ``secateur[data]``).
"""

from __future__ import annotations

from .calibration import (MODES, CalibrationSet, calibration_set, fingerprint, paragraph_stream, text_ids,
                          tokenizer_info)
from .sources import FILE_TYPES, NAMED, TextSource, source

__all__ = ["source", "TextSource", "NAMED", "FILE_TYPES", "calibration_set", "CalibrationSet", "MODES", "fingerprint",
           "paragraph_stream", "text_ids", "tokenizer_info"]
