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


def test_every_python_snippet_defines_what_it_uses():
    """Each ```python block of the README stands alone: every name it reads is imported, assigned
    or a builtin in that block (the second snippet once used an undefined `dense`)."""
    import ast
    import builtins

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        tree = ast.parse(code)
        defined = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= defined, f"README python block {i} uses undefined names {sorted(used - defined)}"
