"""Upstream tiers over real HTTP: a second secateur gateway serves the `stories` family on its own
port, and the gateway under test forwards one of its tiers there. Completions (plain and streamed),
chat and embeddings go through the upstream with our headers and the client's model name; an
upstream 4xx is relayed as it is; an upstream that is down is a 502 with an error object, or — under
the fallback policy — the next tier's answer; a cascade reads the upstream's log-probabilities."""

from __future__ import annotations

import socket

import httpx
import pytest

from secateur.errors import ConfigError
from secateur.serve.config import ServeConfig



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def upstream(launch):
    return launch("stories", "tiers: {small: fast, large: best}\n")


@pytest.fixture(scope="module")
def gateway(launch, upstream):
    return launch("stories", f"tiers:\n  local: fast\n  remote: {{url: '{upstream.url}/v1', model: large}}\n")


def test_completions_and_chat_go_through_the_upstream(gateway, upstream):
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    raw = client.completions.with_raw_response.create(model="remote", prompt="Once upon a time", max_tokens=8,
                                                      temperature=0)
    answer = raw.parse()
    assert raw.headers["x-secateur-tier"] == "remote"
    assert raw.headers["x-secateur-variant"] == f"upstream:{upstream.url}/v1#large"
    assert answer.model == "remote" and answer.choices[0].text and answer.usage.completion_tokens >= 1
    assert answer.choices[0].logprobs is None  # asked of the upstream for the policy, not shown to the client
    direct = httpx.post(f"{upstream.url}/v1/completions", json={"model": "large", "prompt": "Once upon a time",
                                                               "max_tokens": 8, "temperature": 0}).json()
    assert answer.choices[0].text == direct["choices"][0]["text"]  # the upstream's own greedy answer
    chat = client.chat.completions.with_raw_response.create(
        model="remote", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6, temperature=0)
    assert chat.headers["x-secateur-tier"] == "remote" and chat.parse().choices[0].message.content is not None
    # the upstream's access log saw the forwarded requests under its own model name
    lines = upstream.access_lines(until=lambda ls: sum(l.get("tier") == "large" for l in ls) >= 3)
    assert sum(line.get("tier") == "large" for line in lines) >= 3


def test_a_streamed_completion_is_relayed(gateway):
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    chunks = list(client.completions.create(model="remote", prompt="Once upon a time", max_tokens=8, temperature=0,
                                            stream=True))
    assert chunks and all(c.model == "remote" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) != ""
    with httpx.stream("POST", f"{gateway.url}/v1/completions",
                      json={"model": "remote", "prompt": "Once", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-secateur-tier"] == "remote"
        assert r.headers["content-type"].startswith("text/event-stream")
        assert [line for line in r.iter_lines() if line.startswith("data:")][-1] == "data: [DONE]"


def test_an_upstream_4xx_is_relayed_and_the_models_list_names_the_upstream(gateway, upstream):
    r = httpx.post(f"{gateway.url}/v1/completions", json={"model": "remote", "prompt": "Once", "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_exceeded"
    r = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "remote", "input": "hello"})
    assert r.status_code == 400 and "error" in r.json()  # the upstream's stories tier embeds nothing
    models = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert models["remote"]["secateur"]["kind"] == "upstream"
    assert models["remote"]["secateur"]["url"] == f"{upstream.url}/v1"


def test_an_upstream_that_is_down_is_a_502_or_the_fallback_tier(start_server):
    closed = f"http://127.0.0.1:{free_port()}/v1"
    server = start_server("stories", f"tiers:\n  remote: {{url: '{closed}', model: x}}\n  local: fast\n")
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "remote", "prompt": "Once", "max_tokens": 4})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
    fallback = start_server("stories", f"tiers:\n  remote: {{url: '{closed}', model: x}}\n  local: fast\n"
                                       "policy: {kind: fallback, order: [remote, local]}\n")
    r = httpx.post(f"{fallback.url}/v1/completions", json={"model": "stories", "prompt": "Once", "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-secateur-tier"] == "local"
    lines = fallback.access_lines(until=lambda ls: any(l.get("path") == "/v1/completions" for l in ls))
    assert any(line.get("tier") == "local" for line in lines)


def test_a_cascade_reads_the_upstream_small_tiers_logprobs(start_server, upstream):
    """The small tier is the upstream: a threshold above every log-probability escalates every
    request to the local tier, one below all of them never does."""
    for threshold, tier in ((1.0, "local"), (-1e9, "remote")):
        server = start_server("stories", f"tiers:\n  remote: {{url: '{upstream.url}/v1', model: small}}\n"
                                         f"  local: best\npolicy: {{kind: cascade, threshold: {threshold}}}\n")
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "stories", "prompt": "Once", "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-secateur-tier"] == tier, r.text
        server.stop()


@pytest.mark.parametrize("tiers, path", [
    ({"r": {"url": "ftp://x/v1", "model": "m"}}, "tiers.r.url"),
    ({"r": {"url": "http://127.0.0.1:1/v1"}}, "tiers.r.model"),
    ({"r": {"url": "http://127.0.0.1:1/v1", "model": "m", "key": "k"}}, "tiers.r.key"),
    ({"r": {"url": "http://127.0.0.1:1/v1", "model": "m", "timeout_s": -1}}, "tiers.r.timeout_s"),
])
def test_a_bad_upstream_tier_is_one_line_naming_its_key(tiers, path):
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_dict({"tiers": tiers})
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_an_upstream_that_breaks_mid_stream_ends_the_stream_with_an_error_event(start_server):
    """A real socket on loopback answers one event of a chunked stream, then hangs up: the client
    gets that event, an error event and [DONE] (never a hung or torn connection)."""
    import json
    import threading

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    event = b'data: {"id":"c","object":"text_completion","model":"m","choices":[{"index":0,"text":"Once"}]}\n\n'

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + f"{len(event):x}\r\n".encode() + event + b"\r\n")

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        server = start_server("stories", f"tiers:\n  remote: {{url: '{url}', model: m}}\n  local: fast\n")
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                          json={"model": "remote", "prompt": "Once", "max_tokens": 4, "stream": True}) as r:
            data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert r.status_code == 200 and data[-1] == "[DONE]"
        assert json.loads(data[0])["model"] == "remote" and json.loads(data[0])["choices"][0]["text"] == "Once"
        assert json.loads(data[-2])["error"]["code"] == "upstream_error"
    finally:
        listener.close()
        thread.join(timeout=5)
