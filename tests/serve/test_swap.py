"""Changes without a restart, over real HTTP: an alias moved in the registry while a bounded
concurrent load runs loses no request (every answer a 200 with all its tokens), requests sent after
the move come from the new variant (the variant-id header), the variant nothing points at any more
is unloaded, a rollback moves new requests back; the admin API (bearer token, loopback only)
changes the policy for new requests and refuses calls without the token."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = ("tiers: {small: live, large: base}\n"
          "refresh_s: 0.2\n"
          "unload_idle_s: 0\n"
          f"admin: {{enabled: true, token: {TOKEN}}}\n"
          "batching: {window_ms: 2, max_batch: 16}\n"
          "limits: {max_concurrency: 64, timeout_s: 60}\n")


@pytest.fixture(scope="module")
def swap_family(serve_home: Path) -> dict[str, str]:
    """Family `swap` in the test registry: `base` and `w8` (the stories artifacts), alias live -> w8."""
    from secateur.registry import Registry

    with Registry(serve_home) as registry:
        if "swap" not in registry.families():
            base = registry.add(registry.resolve("stories/base").path, family="swap", name="base")
            w8 = registry.add(registry.resolve("stories/w8").path, family="swap", name="w8")
        else:
            base, w8 = registry.resolve("swap/base"), registry.resolve("swap/w8")
        registry.set_alias("swap", "live", w8.id)
    return {"base": base.id, "w8": w8.id}


@pytest.fixture(scope="module")
def server(swap_family, launch):
    server = launch("swap", CONFIG)
    yield server
    server.stop()


def _state(server) -> dict:
    r = httpx.get(f"{server.url}/admin/state", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def _loaded(server) -> set[str]:
    return {vid for vid, v in _state(server)["variants"].items() if v["loaded"]}


def _until(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_alias_swap_under_load_loses_no_request(server, swap_family, serve_home):
    from secateur.registry import Registry

    total, workers, swap_after = 120, 8, 40
    results: list[tuple[float, float, int, str, int]] = []  # (sent, done, status, variant, completion tokens)
    moved = threading.Event()
    moving: list[float] = []
    refreshed_at: list[float] = []

    def move_alias() -> None:  # what `secateur registry alias swap@live swap/base` does, from another connection
        moving.append(time.monotonic())
        with Registry(serve_home) as registry:
            registry.set_alias("swap", "live", swap_family["base"])
        moved.set()

    async def load() -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        async with httpx.AsyncClient(timeout=60) as client:
            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    sent = time.monotonic()
                    r = await client.post(f"{server.url}/v1/completions",
                                          json={"model": "small" if i % 2 else "swap", "prompt": "Once upon a time",
                                                "max_tokens": 8, "temperature": 0})
                    body = r.json() if r.status_code == 200 else {}
                    results.append((sent, time.monotonic(), r.status_code, r.headers.get("x-secateur-variant", ""),
                                    body.get("usage", {}).get("completion_tokens", 0)))
                    if len(results) == swap_after:
                        await asyncio.to_thread(move_alias)
                        # the poller alone picks the move up; /admin/refresh then marks a point after which
                        # every new request must go to the new variant
                        r = await client.post(f"{server.url}/admin/refresh", headers=AUTH)
                        assert r.status_code == 200, r.text
                        refreshed_at.append(time.monotonic())

            await asyncio.gather(*(worker() for _ in range(workers)))

    assert _loaded(server) >= {swap_family["w8"]}
    asyncio.run(load())
    assert moved.is_set() and len(results) == total
    assert [s for _, _, s, _, _ in results] == [200] * total  # no request lost
    assert all(n == 8 for *_, n in results)                       # and each got every token it asked for
    before = [v for _, done, _, v, _ in results if done < moving[0]]  # answered before the alias moved
    assert len(before) >= swap_after - 1 and set(before) == {swap_family["w8"]}
    after = [v for sent, _, _, v, _ in results if sent > refreshed_at[0]]
    assert after and set(after) == {swap_family["base"]}
    # w8: no tier, alias or default points at it any more, no request holds it -> unloaded
    assert _until(lambda: swap_family["w8"] not in _loaded(server)), _state(server)
    assert swap_family["base"] in _loaded(server)

    # a rollback, picked up by the poller alone: new requests go back to w8 (loaded again)
    with Registry(serve_home) as registry:
        registry.rollback("swap", "live")

    def back() -> bool:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "small", "prompt": "Once", "max_tokens": 2})
        return r.status_code == 200 and r.headers["x-secateur-variant"] == swap_family["w8"]

    assert _until(back, timeout=20)
    state = _state(server)
    assert state["aliases"]["live"] == swap_family["w8"] and state["tiers"]["small"] == swap_family["w8"]


def test_admin_api_needs_the_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
        r = httpx.get(f"{server.url}/admin/state", headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{server.url}/admin/policy", headers=headers, json={"kind": "fallback"})
        assert r.status_code == 401
    assert _state(server)["policy"]["kind"] == "static"


def test_admin_policy_change_reaches_new_requests(server):
    def routed() -> httpx.Response:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "swap", "prompt": "Once", "max_tokens": 2})
        assert r.status_code == 200, r.text
        return r

    assert routed().headers["x-secateur-decision"] == "static"
    bad = {"kind": "canary", "canary": "nope"}
    r = httpx.post(f"{server.url}/admin/policy", headers=AUTH, json=bad)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_policy"
    assert "unknown tier 'nope'" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/admin/policy", headers={**AUTH, "content-type": "application/json"}, content=b"{oops")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.url}/admin/policy", headers=AUTH, json={"kind": "canary", "canary": "large", "percent": 100})
    assert r.status_code == 200, r.text
    assert r.json()["policy"]["kind"] == "canary" and r.json()["previous"]["kind"] == "static"
    answer = routed()
    assert answer.headers["x-secateur-decision"] == "canary" and answer.headers["x-secateur-tier"] == "large"
    r = httpx.post(f"{server.url}/admin/policy", headers=AUTH, json={"kind": "static"})
    assert r.status_code == 200 and routed().headers["x-secateur-decision"] == "static"


def test_admin_api_is_loopback_only_unless_allowed(serve_home, swap_family):
    from starlette.testclient import TestClient

    from secateur.serve import create_app
    from secateur.serve.config import ServeConfig

    for allow, expected in ((False, 403), (True, 200)):
        config = ServeConfig.from_dict({"tiers": {"small": "live"},
                                        "admin": {"enabled": True, "token": TOKEN, "allow_remote": allow}})
        app = create_app("swap", config, serve_home)
        r = TestClient(app).get("/admin/state", headers=AUTH)  # its client host is "testclient", not the loopback
        assert r.status_code == expected, r.text
        if expected == 403:
            assert r.json()["error"]["code"] == "forbidden"
        app.state.gateway.family.close()


def test_admin_api_refuses_to_start_without_a_token(capsys, serve_home, swap_family, tmp_path, monkeypatch):
    from secateur.testing import run_cli

    monkeypatch.delenv("SECATEUR_ADMIN_TOKEN", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text("admin: {enabled: true}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "serve", "swap", "--config", str(path), "--home", str(serve_home))
    assert code == 2 and "needs a bearer token: set SECATEUR_ADMIN_TOKEN" in err
    assert len(err.strip().splitlines()) == 1
    path.write_text("admin: {enabled: true, token: short}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "serve", "swap", "--config", str(path), "--home", str(serve_home))
    assert code == 2 and "at least 16" in err
