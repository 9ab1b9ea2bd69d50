"""Limits and failures over real HTTP: body size (413, declared or chunked), max tokens and context
length (400), per-request timeout (504, and an error event in a stream already started), the
concurrency cap (429 with Retry-After), and the fallback policy retrying on another tier when the
chosen one fails to load."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import httpx
import pytest

TIGHT = ("tiers: {small: fast, large: best}\n"
         "limits: {max_concurrency: 1, max_body_bytes: 4096, max_tokens: 500, timeout_s: 1.0, retry_after_s: 2}\n")


@pytest.fixture(scope="module")
def tight(launch):
    server = launch("stories", TIGHT)
    yield server
    server.stop()


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def test_body_size_limit_declared_and_chunked(tight):
    big = {"model": "small", "prompt": "x" * 5000}
    _error(httpx.post(f"{tight.url}/v1/completions", json=big), 413, "request_too_large")

    def chunks():
        yield b'{"model": "small", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    _error(httpx.post(f"{tight.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
           413, "request_too_large")


def test_max_tokens_and_context_length(tight):
    error = _error(httpx.post(f"{tight.url}/v1/completions", json={"model": "small", "prompt": "Hi", "max_tokens": 600}),
                   400, "max_tokens_exceeded")
    assert error["param"] == "max_tokens"
    long_prompt = "Once upon a time " * 150  # about 600 tokens; the model has 512 positions
    error = _error(httpx.post(f"{tight.url}/v1/completions", json={"model": "small", "prompt": long_prompt}),
                   400, "context_length_exceeded")
    assert "512" in error["message"] and error["param"] == "prompt"
    error = _error(httpx.post(f"{tight.url}/v1/completions",
                              json={"model": "small", "prompt": "Once upon a time " * 80, "max_tokens": 300}),
                   400, "context_length_exceeded")
    assert error["param"] == "max_tokens"
    error = _error(httpx.post(f"{tight.url}/v1/chat/completions",
                              json={"model": "small", "messages": [{"role": "user", "content": long_prompt}]}),
                   400, "context_length_exceeded")
    assert error["param"] == "messages"


SLOW = ["Once"] * 64  # 64 prompts x 500 tokens: seconds of work on any machine, against a 1 s limit


def test_timeout_is_504_and_the_server_goes_on(tight):
    r = httpx.post(f"{tight.url}/v1/completions", json={"model": "small", "prompt": SLOW, "max_tokens": 500,
                                                          "temperature": 0}, timeout=30)
    error = _error(r, 504, "timeout")
    assert error["type"] == "timeout_error"
    with httpx.stream("POST", f"{tight.url}/v1/completions", timeout=30,
                      json={"model": "small", "prompt": SLOW, "max_tokens": 500, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "timeout"
    ok = httpx.post(f"{tight.url}/v1/completions", json={"model": "small", "prompt": "Once", "max_tokens": 4})
    assert ok.status_code == 200  # slots and rows of the timed-out requests were given back


def test_concurrency_cap_answers_429_with_retry_after(tight):
    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{tight.url}/v1/completions",
                                                      json={"model": "small", "prompt": "Once upon a time",
                                                            "max_tokens": 120}) for _ in range(8)))

    answers = asyncio.run(burst())
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429, 504} and 429 in statuses and statuses.count(429) < 8
    refused = answers[statuses.index(429)]
    assert refused.headers["retry-after"] == "2"
    assert _error(refused, 429, "rate_limit_exceeded")["type"] == "rate_limit_error"
    metrics = httpx.get(f"{tight.url}/metrics").text
    assert 'secateur_errors_total{kind="rate_limit_exceeded"}' in metrics


@pytest.fixture(scope="module")
def flaky_family(serve_home: Path, stories_dir: Path, tmp_path_factory) -> str:
    """Family `flaky`: `bad` (an RTN W4 artifact whose stored weights were then damaged) and `good`."""
    import secateur
    from secateur import artifacts
    from secateur.registry import Registry

    made = tmp_path_factory.mktemp("flaky")
    loaded = artifacts.load(stories_dir)
    good = secateur.save(loaded.model, made / "good", tokenizer=loaded.tokenizer)
    secateur.compress_(loaded.model, secateur.RTNConfig(bits=4, group_size=32))
    bad = secateur.save(loaded.model, made / "bad", tokenizer=loaded.tokenizer)
    with Registry(serve_home) as registry:
        registry.add(good, family="flaky", name="good")
        variant = registry.add(bad, family="flaky", name="bad")
    weights = next(Path(variant.path).glob("*.safetensors"))
    os.chmod(weights, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\0" * 100
    weights.write_bytes(bytes(data))
    return "flaky"


def test_fallback_retries_on_the_next_tier_when_a_variant_fails(flaky_family, launch):
    server = launch(flaky_family, "default: second\ntiers: {first: bad, second: good}\n"
                                  "policy: {kind: fallback, order: [first, second]}\n")
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "flaky", "prompt": "Once", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.headers["x-secateur-tier"] == "second" and r.headers["x-secateur-decision"] == "fallback"
        pinned = httpx.post(f"{server.url}/v1/completions", json={"model": "first", "prompt": "Once", "max_tokens": 4})
        assert pinned.status_code == 200 and pinned.headers["x-secateur-tier"] == "second"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'secateur_escalations_total{decision="fallback",from_tier="first",to_tier="second"}' in metrics
        lines = server.access_lines(until=lambda ls: len(ls) >= 2)
        assert [line["decision"] for line in lines[:2]] == ["fallback", "fallback"]
    finally:
        server.stop()
