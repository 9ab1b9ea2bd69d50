"""The README's quickstart runs as written (with the shared folder wherever it is) and prints
the figures it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs(shared_dir, data_dir, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("../shared", str(shared_dir))
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README quickstart", "exec"), {})
    values = [float(line) for line in printed.getvalue().split()]
    assert f"{values[0]:.3f}" == "5.508" and f"{values[1]:.2f}" == "19.07"
    assert (tmp_path / "runs" / "stories-sg50" / "compression.json").exists()
