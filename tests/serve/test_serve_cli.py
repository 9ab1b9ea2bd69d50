"""`secateur serve` refuses bad input in one line before opening a socket: an unknown family (naming
the valid ones), a config with an unknown key (did-you-mean), a tier that resolves to nothing, an
unknown policy. `import secateur` (and the CLI module) never import the web stack."""

from __future__ import annotations

import subprocess
import sys

from secateur.testing import run_cli


def test_unknown_family_names_the_valid_ones(capsys, serve_home):
    code, _, err = run_cli(capsys, "serve", "storeis", "--home", str(serve_home))
    assert code == 2
    assert "unknown family 'storeis' (did you mean 'stories'?)" in err and "'minilm'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_config_files_are_one_line_errors(capsys, serve_home, tmp_path):
    cases = {
        "tierz: {small: fast}\n": "tierz: unknown key (did you mean 'tiers'?)",
        "limits: {max_concurency: 3}\n": "limits.max_concurency: unknown key (did you mean 'max_concurrency'?)",
        "limits: {max_tokens: -3}\n": "limits.max_tokens: expected an integer",
        "tiers: {small: fsat}\n": "tier 'small': 'fsat' is no alias, variant name or id of family 'stories' "
                                  "(did you mean 'fast'?)",
        "tiers: {small: fast}\npolicy: {kind: statik}\n": "unknown policy 'statik' (did you mean 'static'?)",
        "tiers: {small: fast}\npolicy: {kind: static, wieghts: {small: 1}}\n": "policy.wieghts: unknown key (did you "
                                                                                "mean 'weights'?)",
        "tiers: {small: fast}\npolicy: {kind: static, weights: {smal: 1}}\n": "unknown tier 'smal'",
        "tiers: [\n": "is not valid YAML",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"serve{i}.yaml"
        path.write_text(text, encoding="utf-8")
        code, _, err = run_cli(capsys, "serve", "stories", "--config", str(path), "--home", str(serve_home))
        assert code == 2, (text, err)
        assert expected in err, (text, err)
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "serve", "stories", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err


def test_import_secateur_does_not_import_the_web_stack():
    probe = ("import sys, secateur, secateur.cli, secateur.serve, secateur.serve.config, secateur.serve.policy; "
             "bad = [m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette') if m in sys.modules]; "
             "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_ray_backend_refuses_bad_input_in_one_line(capsys, serve_home, monkeypatch, tmp_path):
    """An unknown family or a tier that resolves to nothing fails as with the local backend, before
    Ray is imported; without Ray installed (its import made to fail) the hint is the extra to
    install; an unknown backend lists the valid ones."""
    code, _, err = run_cli(capsys, "serve", "storeis", "--backend", "ray", "--home", str(serve_home))
    assert code != 0 and "unknown family 'storeis' (did you mean 'stories'?)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "serve.yaml"
    bad.write_text("tiers: {small: fsat}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "serve", "stories", "--backend", "ray", "--home", str(serve_home),
                           "--config", str(bad))
    assert code != 0 and "(did you mean 'fast'?)" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    code, _, err = run_cli(capsys, "serve", "stories", "--backend", "ray", "--home", str(serve_home))
    assert code != 0 and "pip install 'secateur[ray]'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run_cli(capsys, "serve", "stories", "--backend", "spark")
    assert code != 0 and "valid: local, ray" in err and len(err.strip().splitlines()) == 1
