"""At least 1,000 malformed requests against a real gateway process: every answer is a 4xx carrying the
OpenAI error object (never a 500, never a hung connection), and the server still answers a good
request afterwards."""

from __future__ import annotations

import asyncio
import json
import random
import string

import httpx

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
JUNK_VALUES = [None, True, False, -1, 0, 3.5, -1e308, 1e308, 10 ** 30, -(10 ** 30), "", "5", "\u0000", "\ud7ff\ufffe",
               "😀" * 50, [], [None], [[1]], {}, {"a": 1}, [1, "a"], ["x"] * 5, list(range(5))]
FIELDS = {
    "/v1/completions": {"model": "small", "prompt": "Once", "max_tokens": 4},
    "/v1/chat/completions": {"model": "small", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "/v1/embeddings": {"model": "small", "input": "hello"},
}
BAD_FIELDS = {
    "max_tokens": [-1, 0, 10 ** 12, "5", 2.5, True, None.__class__.__name__],
    "temperature": [-0.1, 2.5, "hot", [1]],
    "top_p": [0, 1.5, -1, "x"],
    "stop": [["a", "b", "c", "d", "e"], [1], "", [""], {"x": 1}],
    "logprobs": [-1, 100, "2"],
    "stream": ["yes", 1, [True]],
    "n": [0, 3, -5, "2"],
    "seed": ["x", 2 ** 70, 1.5],
    "echo": [True],
    "messages": [[], [{"role": "robot", "content": "x"}], [{"content": "x"}], [{"role": "user", "content": 5}], "hi"],
    "input": [[], [""], 5, [1, 2], [["a"]]],
    "encoding_format": ["hex", 1],
    "stream_options": [{"include_usage": "yes"}, 5],
}


GENERATION = {"max_tokens", "temperature", "top_p", "stop", "logprobs", "stream", "n", "seed", "stream_options"}
RELEVANT = {"/v1/completions": GENERATION | {"echo"}, "/v1/chat/completions": GENERATION | {"messages"},
            "/v1/embeddings": {"input", "encoding_format"}}


def _valid(key: str, value) -> bool:
    """Whether a junk value happens to be a valid value of ``key`` (then it is no malformed request)."""
    strings = lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v)  # noqa: E731
    if key == "prompt":
        return isinstance(value, str) or strings(value) or (
            isinstance(value, list) and value and all(type(x) is int and 0 <= x < 512 for x in value))
    if key == "input":
        return (isinstance(value, str) and value != "") or (strings(value) and all(value))
    if key == "max_tokens":
        return value is None or (type(value) is int and 1 <= value <= 64)
    return False


def _unicode_junk(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x2FFF), rng.randint(0x1F300, 0x1F6FF)]))
                   for _ in range(n))


def _cases(seed: int = 0, count: int = 1100) -> list[dict]:
    """(method, path, headers, content) of malformed requests, of many kinds, reproducibly."""
    rng = random.Random(seed)
    cases = []
    kinds = ["bytes", "not_object", "wrong_type", "bad_field", "missing", "unknown_model", "content_type", "path",
             "method", "huge", "nested", "context", "bad_utf8", "empty", "vocab", "wrong_endpoint"]
    for i in range(count):
        kind = kinds[i % len(kinds)]
        path = rng.choice(ENDPOINTS)
        headers = {"content-type": "application/json"}
        method = "POST"
        body = dict(FIELDS[path])
        content: bytes
        if kind == "bytes":
            content = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        elif kind == "not_object":
            content = json.dumps(rng.choice([[1, 2], 3, "text", None, True, [body]])).encode()
        elif kind == "wrong_type":
            key = rng.choice(list(body))
            body[key] = rng.choice([v for v in JUNK_VALUES if not _valid(key, v)])
            if key == "model":
                body[key] = rng.choice([None, 5, [], {}, "", True])
            content = json.dumps(body).encode()
        elif kind == "bad_field":
            key = rng.choice(sorted(RELEVANT[path]))
            body[key] = rng.choice(BAD_FIELDS[key])
            content = json.dumps(body).encode()
        elif kind == "missing":
            body.pop(rng.choice(list(body)[:2]))
            content = json.dumps(body).encode()
        elif kind == "unknown_model":
            body["model"] = _unicode_junk(rng, rng.randint(1, 40))
            content = json.dumps(body).encode()
        elif kind == "content_type":
            headers["content-type"] = rng.choice(["text/plain", "multipart/form-data; boundary=x",
                                                  "application/x-www-form-urlencoded", "image/png", "application/xml"])
            content = json.dumps(body).encode()
        elif kind == "path":
            path = rng.choice(["/v1/foo", "/v2/completions", "/v1/completions/extra", "/", "/admin",
                               "/v1/" + "".join(rng.choices(string.ascii_letters, k=12)), "/%F0%9F%98%80/x"])
            content = json.dumps(body).encode()
        elif kind == "method":
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
            content = json.dumps(body).encode() if method != "GET" else b""
        elif kind == "huge":
            text = json.dumps(body)
            content = text.replace('"Once"', "1e400").replace('"hello"', "-1e400").replace("4}", "1e400}").encode()
            if content == text.encode():
                content = text[:-1].encode() + b', "max_tokens": 99999999999999999999999999999999}'
        elif kind == "nested":
            depth = rng.choice([50, 5000, 100000])
            content = b'{"model": "small", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
        elif kind == "context":
            path = "/v1/completions"
            body = {"model": "small", "prompt": list(range(3, 603)), "max_tokens": 4}
            content = json.dumps(body).encode()
        elif kind == "bad_utf8":
            content = b'{"model": "small", "prompt": "\xff\xfe\xfd"}'
        elif kind == "empty":
            content = rng.choice([b"", b" ", b"{", b'{"model":', b"null"])
        elif kind == "vocab":
            path = "/v1/completions"
            body = {"model": "small", "prompt": [1, rng.choice([-1, 512, 10 ** 9])], "max_tokens": 2}
            content = json.dumps(body).encode()
        else:  # embeddings of a causal LM, or a prompt of NaN
            path = "/v1/embeddings" if rng.random() < 0.5 else "/v1/completions"
            content = (json.dumps({"model": "small", "input": "hi"}).encode() if path == "/v1/embeddings" else
                       b'{"model": "small", "prompt": "hi", "temperature": NaN}')
        cases.append({"method": method, "path": path, "headers": headers, "content": content, "kind": kind})
    return cases


def test_a_thousand_malformed_requests_all_get_a_4xx_error_object(stories_server):
    cases = _cases()
    assert len(cases) >= 1000

    async def fire():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=stories_server.url, timeout=20) as client:
            async def one(case):
                async with limit:
                    return case, await client.request(case["method"], case["path"], headers=case["headers"],
                                                      content=case["content"])

            return await asyncio.gather(*(one(c) for c in cases))

    answers = asyncio.run(fire())
    bad = []
    for case, r in answers:
        try:
            error = r.json()["error"]
            ok = 400 <= r.status_code < 500 and isinstance(error["message"], str) and error["message"] and \
                {"type", "param", "code"} <= set(error)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            bad.append((case["kind"], case["method"], case["path"], case["content"][:120], r.status_code, r.text[:200]))
    assert bad == [], "\n".join(map(repr, bad))
    kinds = {case["kind"] for case, _ in answers}
    assert len(kinds) == 16
    good = httpx.post(f"{stories_server.url}/v1/completions", json={"model": "small", "prompt": "Once", "max_tokens": 3})
    assert good.status_code == 200
