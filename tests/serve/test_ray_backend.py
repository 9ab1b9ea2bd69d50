"""`secateur serve FAMILY --backend ray`: the gateway as a Ray Serve application (an ingress running
the same app and policies, one deployment per variant), on a local Ray instance the test starts
and stops. The OpenAI client gets completions (plain and streamed) and the model list; a static
policy over two tiers sends requests to both variant deployments; SIGTERM shuts Serve and Ray down
and leaves no Ray process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the Ray backend needs pip install 'secateur[ray]' (CI installs it)")

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_processes(tmp: str) -> list[int]:
    """Processes whose command line names the Ray temp folder the test gave (the instance it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if tmp.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_the_gateway_runs_as_a_ray_serve_application(serve_home, stories_dir, tmp_path):
    import secateur
    from openai import OpenAI
    from secateur import artifacts
    from secateur.registry import Registry

    home = tmp_path / "home"  # a copy: this test registers a variant and moves an alias
    shutil.copytree(serve_home, home)

    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text("tiers: {small: fast, large: best}\npolicy: {kind: static, weights: {small: 1, large: 1}}\n",
                      encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SECATEUR_PROGRESS": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "secateur.cli", "serve", "stories", "--backend", "ray", "--port",
                             str(port), "--home", str(home), "--config", str(config)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ready", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the Ray Serve gateway did not become ready: " + (tmp_path / "server.log").read_text()[-3000:])
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        tiers, variants = set(), set()
        for i in range(8):
            raw = client.completions.with_raw_response.create(model="stories", prompt="Once upon a time",
                                                              max_tokens=6, temperature=0)
            answer = raw.parse()
            assert answer.choices[0].text and answer.usage.completion_tokens == 6
            assert raw.headers["x-secateur-decision"] == "static"
            tiers.add(raw.headers["x-secateur-tier"])
            variants.add(raw.headers["x-secateur-variant"])
        assert tiers == {"small", "large"} and len(variants) == 2  # both variant deployments answered
        pinned = client.completions.create(model="large", prompt="Once upon a time", max_tokens=6, temperature=0)
        local = httpx.post(f"{url}/v1/completions", json={"model": "large", "prompt": "Once upon a time",
                                                          "max_tokens": 6, "temperature": 0}).json()
        assert pinned.choices[0].text == local["choices"][0]["text"]
        chunks = list(client.completions.create(model="small", prompt="Once upon a time", max_tokens=6,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) != ""
        ids = {m.id for m in client.models.list().data}
        assert {"stories", "small", "large"} <= ids
        bad = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
        assert bad.status_code == 404 and "valid" in bad.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200
        assert "secateur_requests_total" in httpx.get(f"{url}/metrics").text
        # a variant registered while the gateway runs gets its own application; the alias moved to it is served
        w4 = artifacts.load(stories_dir)
        secateur.compress_(w4.model, secateur.RTNConfig(bits=4, strategy="channel"))
        w4_dir = secateur.save(w4.model, tmp_path / "stories-w4", tokenizer=w4.tokenizer)
        with Registry(home) as registry:
            new = registry.add(w4_dir, family="stories", name="w4")
            registry.set_alias("stories", "fast", new.id)
        end = time.monotonic() + 120
        while True:
            moved = httpx.post(f"{url}/v1/completions", json={"model": "small", "prompt": "Once upon a time",
                                                              "max_tokens": 4, "temperature": 0}, timeout=150)
            if moved.status_code == 200 and moved.headers["x-secateur-variant"] == new.id:
                break
            assert time.monotonic() < end, (moved.status_code, moved.text[:300], moved.headers)
            time.sleep(0.5)
        assert moved.json()["choices"][0]["text"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        left = _ray_processes(ray_tmp)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert left == [], "Ray processes left after SIGTERM"


def test_an_unknown_backend_is_one_line(capsys):
    from secateur.testing import run_cli

    code, out, err = run_cli(capsys, "serve", "stories", "--backend", "spark")
    assert code != 0 and "valid: local, ray" in err and "Traceback" not in err
