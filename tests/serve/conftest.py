"""Real gateways for the serving tests: a registry holding a stories260K family (the base and an RTN
W8 variant made with secateur's own API) and a MiniLM family, and `secateur serve` processes on
127.0.0.1 that the tests talk to over HTTP. Every process is stopped when its fixture ends
(terminate, then kill)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_home(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path, minilm_dir: Path) -> Path:
    """A registry: `stories` (base, w8 = RTN 8-bit per channel; aliases fast -> w8, best -> base) and
    `minilm` (base; alias default)."""
    import secateur
    from secateur import artifacts
    from secateur.registry import Registry

    home = tmp_path_factory.mktemp("serve-home")
    made = tmp_path_factory.mktemp("serve-artifacts")
    base = artifacts.load(stories_dir)
    base_dir = secateur.save(base.model, made / "stories-base", tokenizer=base.tokenizer)
    quant = artifacts.load(base_dir)
    secateur.compress_(quant.model, secateur.RTNConfig(bits=8, strategy="channel"))
    w8_dir = secateur.save(quant.model, made / "stories-w8", tokenizer=quant.tokenizer)
    mini = artifacts.load(minilm_dir)
    mini_dir = secateur.save(mini.model, made / "minilm-base", tokenizer=mini.tokenizer)
    with Registry(home) as registry:
        b = registry.add(base_dir, family="stories", name="base")
        w = registry.add(w8_dir, family="stories", name="w8")
        registry.set_alias("stories", "fast", w.id)
        registry.set_alias("stories", "best", b.id)
        m = registry.add(mini_dir, family="minilm", name="base")
        registry.set_alias("minilm", "default", m.id)
    return home


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `secateur serve` process on 127.0.0.1 (its output in a file, never a pipe that could fill)."""

    def __init__(self, home: Path, family: str, tmp: Path, config: Optional[str] = None, ready: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        self.access = tmp / f"access-{self.port}.jsonl"
        args = [sys.executable, "-m", "secateur.cli", "serve", family, "--port", str(self.port), "--home", str(home)]
        if config is not None:
            path = tmp / f"serve-{self.port}.yaml"
            path.write_text(config + f"\naccess_log: {self.access}\n", encoding="utf-8")
            args += ["--config", str(path)]
        else:
            path = tmp / f"serve-{self.port}.yaml"
            path.write_text(f"access_log: {self.access}\n", encoding="utf-8")
            args += ["--config", str(path)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SECATEUR_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def access_lines(self, until: Any = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access log's lines; with ``until`` (a predicate on the list), wait for it to hold (a line
        is written just after its response is sent)."""
        import json

        end = time.monotonic() + timeout
        while True:
            text = self.access.read_text(encoding="utf-8") if self.access.exists() else ""
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            if until is None or until(lines) or time.monotonic() > end:
                return lines
            time.sleep(0.05)

    def stop(self) -> None:
        if self._out.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()


@pytest.fixture
def start_server(serve_home: Path, tmp_path: Path) -> Iterator[Any]:
    """``start_server(family, config_yaml=None, ready=True) -> Server``; all stopped at test end."""
    yield from _serving(lambda family, config=None, ready=True: Server(serve_home, family, tmp_path, config, ready))


@pytest.fixture(scope="session")
def launch(serve_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``launch(family, config_yaml=None) -> Server`` for module-scoped servers; each is stopped at the
    end of the session at the latest (a module may stop its own earlier with ``server.stop()``)."""
    yield from _serving(lambda family, config=None: Server(serve_home, family,
                                                           tmp_path_factory.mktemp(f"{family}-server"), config))


def _serving(make: Any) -> Iterator[Any]:
    """Yield a ``start(...)`` that makes servers with ``make``; stop every one it made afterwards."""
    servers: list[Server] = []

    def start(*args: Any, **kwargs: Any) -> Server:
        servers.append(make(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def stories_server(serve_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One stories gateway shared by the session: tiers small (fast) and large (best), static weights."""
    config = ("tiers: {small: fast, large: best}\n"
              "policy: {kind: static, weights: {small: 1, large: 1}, seed: 0}\n"
              "batching: {window_ms: 5, max_batch: 16}\n"
              "limits: {max_tokens: 64, max_body_bytes: 65536, max_concurrency: 64, timeout_s: 30}\n"
              "preload: [large]\n")
    server = Server(serve_home, "stories", tmp_path_factory.mktemp("stories-server"), config)
    yield server
    server.stop()
