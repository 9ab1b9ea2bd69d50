"""Batching: greedy tokens of a prompt decoded alone equal its tokens decoded in a batch with prompts of
other lengths, including prompts that join a running batch between decode steps (continuous
batching), in the runtime and through the gateway under concurrent requests."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from secateur.runtime.batching import DecodeBatch, Sampling, Sequence

PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went to the park to play with a big red ball and", "One day",
           "Tim had a dog named Max. Max liked to"]
GREEDY = Sampling(temperature=0.0, top_logprobs=1)


@pytest.fixture(scope="module")
def stories(stories_dir: Path):
    from secateur import artifacts

    loaded = artifacts.load(stories_dir)
    return loaded.model, loaded.tokenizer


def _alone(model, tokenizer, prompt: str, n: int) -> Sequence:
    batch = DecodeBatch(model)
    seq = Sequence(tokenizer(prompt)["input_ids"], n, GREEDY)
    batch.admit([seq])
    while len(batch):
        batch.step()
        batch.drop()
    return seq


def test_batched_and_joining_rows_decode_the_tokens_of_each_prompt_alone(stories):
    model, tokenizer = stories
    alone = [_alone(model, tokenizer, p, 24) for p in PROMPTS]
    batch = DecodeBatch(model)
    seqs = [Sequence(tokenizer(p)["input_ids"], 24 - 4 * (i % 2), GREEDY) for i, p in enumerate(PROMPTS)]
    batch.admit(seqs[:2])  # two rows start
    for _ in range(5):
        batch.step()
        batch.drop()
    batch.admit(seqs[2:4])  # two longer/shorter prompts join the running batch
    for _ in range(3):
        batch.step()
        batch.drop()
    batch.admit(seqs[4:])
    widths = []
    while len(batch):
        batch.step()
        widths.append(batch.width)
        batch.drop()
    for a, b in zip(alone, seqs):
        assert b.tokens == a.tokens[:len(b.tokens)]
        assert b.finish == "length"
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x - y) < 1e-3
    # rows that left take their padding with them: the cache never outgrows the longest live row by much
    assert max(widths) <= max(len(s.prompt) for s in seqs) + 24


def test_seeded_sampling_does_not_depend_on_the_batch(stories):
    model, tokenizer = stories
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7)
    solo = DecodeBatch(model)
    a = Sequence(tokenizer(PROMPTS[0])["input_ids"], 16, sampling)
    solo.admit([a])
    while len(solo):
        solo.step()
        solo.drop()
    batch = DecodeBatch(model)
    b = Sequence(tokenizer(PROMPTS[0])["input_ids"], 16, sampling)
    others = [Sequence(tokenizer(p)["input_ids"], 16, Sampling(temperature=1.0, seed=i)) for i, p in enumerate(PROMPTS[1:])]
    batch.admit(others + [b])
    while len(batch):
        batch.step()
        batch.drop()
    assert a.tokens == b.tokens


def test_concurrent_requests_share_forward_passes_and_answer_as_if_alone(stories_server):
    url = f"{stories_server.url}/v1/completions"
    prompts = PROMPTS * 3
    alone = [httpx.post(url, json={"model": "large", "prompt": p, "max_tokens": 16, "temperature": 0}).json()
             for p in PROMPTS]
    before = _batch_rows(httpx.get(f"{stories_server.url}/metrics").text)

    async def together():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(url, json={"model": "large", "prompt": p, "max_tokens": 16,
                                                                  "temperature": 0}) for p in prompts))

    answers = asyncio.run(together())
    for prompt, answer in zip(prompts, answers):
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["text"] == alone[PROMPTS.index(prompt)]["choices"][0]["text"]
    after = _batch_rows(httpx.get(f"{stories_server.url}/metrics").text)
    # 15 sequences x 16 tokens went through fewer forward passes than one per token per request
    passes = after[1] - before[1]
    rows = after[0] - before[0]
    assert rows >= 15 * 16 and passes < rows / 2


def _batch_rows(metrics: str) -> tuple[float, float]:
    """(rows, passes) of prefill and decode passes summed over variants, from the batch-size histogram."""
    rows = sum(float(m) for m in re.findall(r'secateur_batch_size_sum\{phase="(?:prefill|decode)",variant="[^"]+"\} (\S+)',
                                             metrics))
    passes = sum(float(m) for m in re.findall(
        r'secateur_batch_size_count\{phase="(?:prefill|decode)",variant="[^"]+"\} (\S+)', metrics))
    return rows, passes
