"""/v1/embeddings on a MiniLM family: the official OpenAI client (base64 by default) and plain floats,
equal to evaluation's P2 sentence embeddings (mean pooled, L2-normalised), concurrent requests batched
together; an encoder refuses completions and a causal LM refuses embeddings."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run across a snowy field.",
         "The stock market fell sharply today after the announcement."]


@pytest.fixture(scope="module")
def minilm_server(launch):
    server = launch("minilm", "batching: {window_ms: 5, max_batch: 32}\n")
    yield server
    server.stop()


def test_embeddings_match_the_sts_evaluation_pooling(minilm_server, minilm_dir):
    import torch

    from secateur import artifacts
    from secateur.evaluate.sts import sentence_embeddings

    loaded = artifacts.load(minilm_dir)
    expected = sentence_embeddings(loaded.model, loaded.tokenizer, TEXTS)
    r = httpx.post(f"{minilm_server.url}/v1/embeddings", json={"model": "minilm", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-secateur-tier"] == "default" and body["object"] == "list"
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and got.shape == (4, 384)
    assert torch.allclose(got, expected, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids in loaded.tokenizer(TEXTS)["input_ids"])


def test_the_openai_client_reads_embeddings(minilm_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    out = client.embeddings.create(model="default", input=TEXTS[:2])  # the client asks for base64
    floats = httpx.post(f"{minilm_server.url}/v1/embeddings", json={"model": "default", "input": TEXTS[:2]}).json()
    assert len(out.data) == 2 and len(out.data[0].embedding) == 384
    for a, b in zip(out.data, floats["data"]):
        assert max(abs(x - y) for x, y in zip(a.embedding, b["embedding"])) < 1e-6
    single = client.embeddings.create(model="minilm@default", input="hello world", encoding_format="float")
    assert abs(sum(v * v for v in single.data[0].embedding) - 1.0) < 1e-4


def test_concurrent_embeddings_batch_together(minilm_server):
    url = f"{minilm_server.url}/v1/embeddings"
    alone = {t: httpx.post(url, json={"model": "minilm", "input": t}).json()["data"][0]["embedding"] for t in TEXTS}

    async def together():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(url, json={"model": "minilm", "input": t}) for t in TEXTS * 4))

    answers = asyncio.run(together())
    for text, answer in zip(TEXTS * 4, answers):
        got = answer.json()["data"][0]["embedding"]
        assert max(abs(x - y) for x, y in zip(got, alone[text])) < 1e-5
    metrics = httpx.get(f"{minilm_server.url}/metrics").text
    sizes = [float(v) for v in re.findall(r'secateur_batch_size_sum\{[^}]*phase="embed"[^}]*\} (\S+)', metrics)]
    counts = [float(v) for v in re.findall(r'secateur_batch_size_count\{[^}]*phase="embed"[^}]*\} (\S+)', metrics)]
    assert sum(sizes) >= 4 + 16 and sum(counts) < 4 + 16  # some passes embedded several texts


def test_wrong_endpoint_and_over_long_input_are_400(minilm_server, stories_server):
    r = httpx.post(f"{minilm_server.url}/v1/completions", json={"model": "minilm", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
    r = httpx.post(f"{stories_server.url}/v1/embeddings", json={"model": "small", "input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
    r = httpx.post(f"{minilm_server.url}/v1/embeddings", json={"model": "minilm", "input": "word " * 400})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "input"
