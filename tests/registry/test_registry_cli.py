"""``secateur registry ...``: every command, its --json, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secateur.registry import Registry
from secateur.testing import run_cli as run


def test_the_registry_commands(capsys, made: dict[str, Path], tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    reg = ("registry", "--home", home)
    code, out, err = run(capsys, *reg, "add", str(made["base"]), "--family", "stories", "--json")
    assert code == 0, err
    base = json.loads(out)
    assert base["ref"] == "stories/base" and base["status"] == "admitted" and "card" not in base
    code, out, err = run(capsys, *reg, "add", str(made["pruned"]), "-f", "stories", "--name", "p50")
    assert code == 0 and "stories/p50" in out and f"from {base['id']}" in out
    pruned = Registry(home).resolve("stories/p50")

    code, out, _ = run(capsys, *reg, "alias", "stories@fast", base["id"])
    assert code == 0 and f"stories@fast → {base['id']}" in out
    code, out, _ = run(capsys, *reg, "alias", "stories@fast", "stories/p50")
    assert code == 0 and f"(was {base['id']})" in out
    code, out, _ = run(capsys, *reg, "rollback", "stories@fast", "--json")
    assert code == 0 and json.loads(out)["variant_id"] == base["id"]

    code, out, _ = run(capsys, *reg, "list", "--json")
    rows = json.loads(out)
    assert [r["ref"] for r in rows] == ["stories/base", "stories/p50"] and rows[0]["aliases"] == ["stories@fast"]
    assert rows[1]["parent_id"] == base["id"]
    code, out, _ = run(capsys, *reg, "list", "stories")
    assert code == 0 and "2 variants of stories" in out and "stories@fast" in out and "magnitude" in out

    Registry(home).record_evaluation(pruned.id, {"task": "perplexity", "protocol": "P1", "metric": "perplexity",
                                                 "value": 12.25, "settings": {"seq_len": 256}})
    code, out, _ = run(capsys, *reg, "show", "stories/p50")
    assert code == 0 and pruned.id in out and "magnitude" in out and "12.25" in out and "evaluations" in out
    code, out, _ = run(capsys, *reg, "show", "stories@fast", "--json")
    shown = json.loads(out)
    assert shown["id"] == base["id"] and shown["card"]["weights_sha256"] == base["weights_sha256"]

    code, out, _ = run(capsys, *reg, "lineage", "stories/p50")
    lines = out.strip().splitlines()
    assert code == 0 and "stories/base" in lines[0] and "stories@fast" in lines[0]
    assert "stories/p50" in lines[1] and "◀" in lines[1] and "magnitude 0.5" in lines[1] and lines[1].startswith("└")
    code, out, _ = run(capsys, *reg, "lineage", "stories/p50", "--json")
    assert json.loads(out)["children"][0]["target"] is True

    code, out, _ = run(capsys, *reg, "compare", "stories/base", "stories/p50")
    assert code == 0 and "perplexity (P1)" in out and "12.25" in out and "sparsity" in out
    code, out, _ = run(capsys, *reg, "compare", "stories/base", "stories/p50", "--json")
    assert [r["ref"] for r in json.loads(out)] == ["stories/base", "stories/p50"]

    code, out, err = run(capsys, *reg, "rm", "stories@fast")
    assert code == 2 and "is the target of stories@fast" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, *reg, "rm", "stories/base", "--force")
    assert code == 0 and f"removed {base['id']}" in out
    code, out, _ = run(capsys, *reg, "gc", "--json")
    assert code == 0 and json.loads(out)["removed"] == [base["store_key"]] and json.loads(out)["kept"] == 1


def test_errors_are_one_line_with_exit_code_2(capsys, made: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))  # the setting, without --home
    code, out, err = run(capsys, "registry", "add", str(made["base"]), "--family", "stories")
    assert code == 0 and (tmp_path / "home" / "registry.db").is_file()
    for args, expected in ((("show", "storys@fast"), "unknown family 'storys' (did you mean 'stories'?)"),
                           (("show", "stories@fast"), "has no alias 'fast'; it has no aliases"),
                           (("alias", "stories", "stories/base"), "'stories' is not FAMILY@ALIAS"),
                           (("rollback", "stories@champion"), "family 'stories' has no alias 'champion'"),
                           (("add", str(tmp_path), "--family", "x"), "has no config.json"),
                           (("compare", "v-000000000000"), "no variant 'v-000000000000'")):
        code, out, err = run(capsys, "registry", *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    code, _, err = run(capsys, "registry", "lst")
    assert code == 2 and "did you mean 'list'" in err.lower()
