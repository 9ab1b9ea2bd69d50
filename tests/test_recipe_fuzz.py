"""Hostile recipes: 5,000 mutations of the example recipes (typos, wrong types, NaN / inf / huge /
negative values, deep nesting, YAML anchors and aliases, ``!!python`` tags, invalid UTF-8, random
cuts and byte flips), read from files. Each is either accepted or refused with the project's own
error (one line); nothing else may escape the loader: no RecursionError, no ValueError from an
integer conversion, no YAML constructor error, no hang on an alias bomb."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from secateur.errors import SecateurError
from secateur.recipe import Recipe

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "recipes").glob("*.yaml"))
CASES = 5000


def _edit_a_line(rng: random.Random, text: str, edit) -> str:
    """``text`` with one of its ``key: value`` lines (chosen by ``rng``) passed through ``edit``."""
    lines = text.splitlines()
    candidates = [i for i, line in enumerate(lines) if ":" in line and not line.strip().startswith("#")]
    if not candidates:
        return text
    i = rng.choice(candidates)
    lines[i] = edit(lines[i])
    return "\n".join(lines) + "\n"


def _replace_value(rng: random.Random, text: str, value: str) -> str:
    return _edit_a_line(rng, text, lambda line: f"{line.partition(':')[0]}: {value}")


def _typo(rng: random.Random, text: str) -> str:
    def misspell(line: str) -> str:
        key, sep, rest = line.partition(":")
        stripped = key.strip(" -")
        if len(stripped) < 2:
            return line
        j = rng.randrange(len(stripped))
        new = stripped[:j] + rng.choice("abcdefghijklmnopqrstuvwxyz_") + stripped[j + 1:]
        return key.replace(stripped, new, 1) + sep + rest
    return _edit_a_line(rng, text, misspell)


VALUES = [".nan", ".inf", "-.inf", "-1", "0", "-0.5", "1e308", "1e-320", "99999999999999999999999",
          "9" * 5000, "-" + "9" * 5000, "[1, 2, 3]", "{a: 1}", "null", "true", "''", "'x' ", "~",
          "!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!!binary aGVsbG8=",
          "!!timestamp 2001-12-14", "'" + "x" * 20000 + "'", "&a [*a]", "*undefined", "0x7fffffff",
          "1_000", "0o777", ".NaN", "1.5e-3", "[[[[[]]]]]", "{steps: []}", "\"\\x00\""]


def _deep(rng: random.Random, text: str) -> str:
    depth = rng.choice([40, 120, 600])  # 5000 levels: test_each_bound_has_its_own_line
    if rng.random() < 0.5:
        return _replace_value(rng, text, "[" * depth + "1" + "]" * depth)
    return _replace_value(rng, text, "{a: " * depth + "1" + "}" * depth)


def _aliases(rng: random.Random, text: str) -> str:
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for k in range(1, rng.choice([3, 6, 9])):
        prev = chr(ord("a") + k - 1)
        cur = chr(ord("a") + k)
        bomb.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(bomb) + "\n" + text


def _mutate(rng: random.Random, text: str) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        text = _typo(rng, text)
    elif kind in (1, 2):
        text = _replace_value(rng, text, rng.choice(VALUES))
    elif kind == 3:
        text = _deep(rng, text)
    elif kind == 4:
        text = _aliases(rng, text)
    elif kind == 5:
        text = text[: rng.randrange(len(text) + 1)]
    data = bytearray(text.encode("utf-8"))
    if kind == 6 and data:  # invalid UTF-8
        i = rng.randrange(len(data))
        data[i:i] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"])
    elif kind == 7 and data:  # random byte flips
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 8:  # several mutations at once
        for _ in range(3):
            text = _replace_value(rng, _typo(rng, text), rng.choice(VALUES))
        data = bytearray(text.encode("utf-8"))
    return bytes(data)


def test_examples_exist():
    assert len(EXAMPLES) >= 3


def test_hostile_recipes_are_accepted_or_refused_with_the_projects_error(tmp_path):
    rng = random.Random(1234)
    texts = [p.read_text() for p in EXAMPLES]
    outcomes = {"accepted": 0, "refused": 0}
    for case in range(CASES):
        body = _mutate(rng, rng.choice(texts))
        path = tmp_path / f"r{case % 7}.yaml"
        path.write_bytes(body)
        try:
            Recipe.load(path)
            outcomes["accepted"] += 1
        except SecateurError as exc:
            message = str(exc)
            assert message and "\n" not in message.strip(), (case, message[:300])
            assert len(message) < 2000, (case, message[:300])
            outcomes["refused"] += 1
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {type(exc).__name__}: {str(exc)[:300]}\n--- recipe ---\n{body[:500]!r}")
    assert outcomes["refused"] > CASES // 2 and outcomes["accepted"] > 0, outcomes


@pytest.mark.parametrize("body,message", [
    ("steps:\n  - method: magnitude\n    sparsity: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("steps:\n  - method: magnitude\n    sparsity: " + "9" * 5000 + "\n", "integer"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + k)}: &{chr(98 + k)} [" + ", ".join([f"*{chr(97 + k)}"] * 10) + "]\n" for k in range(8))
     + "steps: []\n", "more than"),
    ("steps:\n  - method: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
])
def test_each_bound_has_its_own_line(tmp_path, body, message):
    path = tmp_path / "r.yaml"
    path.write_text(body)
    with pytest.raises(SecateurError, match=message):
        Recipe.load(path)


def test_json_recipes_are_bounded_too(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"steps": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(SecateurError, match="nested"):
        Recipe.load(path)
    path.write_text('{"steps": [{"method": "magnitude", "sparsity": ' + "9" * 5000 + "}]}")
    with pytest.raises(SecateurError, match="integer|JSON"):
        Recipe.load(path)
    path.write_bytes(b'{"steps": []}\xff')
    with pytest.raises(SecateurError, match="UTF-8"):
        Recipe.load(path)
