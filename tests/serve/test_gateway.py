"""The gateway over real HTTP: a `secateur serve` process on stories260K (base + RTN W8), answered by
httpx and by the official OpenAI client: completions (streamed and not), chat, models, headers,
access log, metrics, health and readiness."""

from __future__ import annotations

import json

import httpx
import pytest


def test_health_ready_and_models(stories_server):
    assert httpx.get(f"{stories_server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{stories_server.url}/ready").json()
    assert ready["status"] == "ready" and ready["default"] == "small"
    models = httpx.get(f"{stories_server.url}/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == "stories"
    for name in ("small", "large", "fast", "best", "stories@fast", "stories@best", "base", "w8"):
        assert name in ids
    kinds = {m["id"]: m["secateur"]["kind"] for m in models["data"]}
    assert kinds["small"] == "tier" and kinds["fast"] == "alias" and kinds["w8"] == "variant"


def test_completion_with_headers_usage_and_logprobs(stories_server):
    r = httpx.post(f"{stories_server.url}/v1/completions",
                   json={"model": "stories@fast", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
                         "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-secateur-decision"] == "pinned" and r.headers["x-secateur-tier"] == "fast"
    assert r.headers["x-secateur-variant"].startswith("v-")
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and choice["text"].strip()
    assert body["usage"]["completion_tokens"] == 12 and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["total_tokens"] == 17
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 12
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) == 2 for t in lp["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    # the same request again gives the same text (greedy is deterministic)
    again = httpx.post(f"{stories_server.url}/v1/completions",
                       json={"model": "fast", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    assert again.json()["choices"][0]["text"] == choice["text"]


def test_routed_requests_follow_the_static_weights(stories_server):
    tiers = []
    for _ in range(12):
        r = httpx.post(f"{stories_server.url}/v1/completions", json={"model": "stories", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        assert r.headers["x-secateur-decision"] == "static"
        tiers.append(r.headers["x-secateur-tier"])
    assert set(tiers) == {"small", "large"}  # seed 0, weights 1:1


def test_seeded_sampling_is_reproducible_and_stops_cut_the_text(stories_server):
    req = {"model": "large", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9,
           "seed": 1234}
    a = httpx.post(f"{stories_server.url}/v1/completions", json=req).json()["choices"][0]["text"]
    b = httpx.post(f"{stories_server.url}/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b
    greedy = httpx.post(f"{stories_server.url}/v1/completions",
                        json={"model": "large", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}).json()
    text = greedy["choices"][0]["text"]
    word = text.split()[2]
    cut = httpx.post(f"{stories_server.url}/v1/completions",
                     json={"model": "large", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0,
                           "stop": [word]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.index(word)]


def test_streamed_completion_is_server_sent_events_ending_in_done(stories_server):
    req = {"model": "small", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True,
           "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{stories_server.url}/v1/completions", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-secateur-tier"] == "small"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    whole = httpx.post(f"{stories_server.url}/v1/completions", json={**req, "stream": False}).json()
    assert text == whole["choices"][0]["text"]


def test_the_openai_client_completions_chat_and_streaming(stories_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{stories_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    listed = [m.id for m in client.models.list()]
    assert "small" in listed
    done = client.completions.create(model="small", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="small", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == done.choices[0].text
    chat = client.chat.completions.create(model="large", messages=[{"role": "user", "content": "Tell a story"}],
                                          max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content is not None
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    pieces = list(client.chat.completions.create(model="large", messages=[{"role": "user", "content": "Tell a story"}],
                                                 max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == chat.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_access_log_and_metrics(stories_server):
    r = httpx.post(f"{stories_server.url}/v1/completions", json={"model": "small", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200
    httpx.post(f"{stories_server.url}/v1/completions", json={"model": "nope", "prompt": "Hello"})
    lines = stories_server.access_lines(until=lambda ls: any(line["status"] == 404 for line in ls))
    ok = [line for line in lines if line["status"] == 200 and line["path"] == "/v1/completions"]
    assert ok and ok[-1]["tier"] == "small" and ok[-1]["decision"] == "pinned"
    assert ok[-1]["variant"] == r.headers["x-secateur-variant"] and ok[-1]["completion_tokens"] == 3
    assert "ttft_ms" in ok[-1] and ok[-1]["latency_ms"] > 0
    assert any(line["status"] == 404 and line["error"] == "model_not_found" for line in lines)
    text = httpx.get(f"{stories_server.url}/metrics").text
    variant = r.headers["x-secateur-variant"]
    for needle in ("secateur_request_seconds_bucket", "secateur_time_to_first_token_seconds_bucket",
                   f'secateur_generated_tokens_total{{variant="{variant}"}}', 'secateur_errors_total{kind="model_not_found"}',
                   "secateur_queue_depth", "secateur_batch_size_bucket", "secateur_resident_memory_bytes",
                   'decision="pinned"'):
        assert needle in text, needle
    rss = [line for line in text.splitlines() if line.startswith("secateur_resident_memory_bytes ")]
    assert float(rss[0].split()[1]) > 1e7
