"""``secateur bench-serve``: a bounded load against a gateway on the loopback.

``concurrency`` clients send streamed completions (``stream_options.include_usage``) until
``requests`` have been sent or ``duration_s`` has passed, whichever comes first; a request still
running ``timeout_s`` after that is abandoned, so the run always ends by itself. For every request
it keeps the status, the latency to ``data: [DONE]``, the time to the first token (the first chunk
with text), the completion tokens (the usage chunk) and who answered (``x-secateur-variant``).

The server's resident memory is read from its ``/metrics`` (``secateur_resident_memory_bytes``) at
the start, once the first ``window`` requests are done, once all but the last ``window`` are done,
and at the end (``window`` = 500, or a quarter of a smaller run): growth between the two middle
readings is what a leak would show.

:func:`run_load` returns a plain dict (also written as JSON by the CLI); :func:`table` formats it.
``on_done(n)`` is called (in a thread) after the n-th answer, for a benchmark that changes
something mid-run (an alias swap); the load goes on while it runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from ..errors import SecateurError

PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The cat sat on the mat and", "Tom had a big red ball.",
           "There was a small dog who", "In the park, the children")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _percentile(values: list[float], p: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    at = p / 100.0 * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


async def _rss(client: Any, url: str) -> Optional[float]:
    try:
        text = (await client.get(f"{url}/metrics", timeout=10)).text
    except Exception:  # noqa: BLE001 - a reading we could not take is reported as missing
        return None
    for line in text.splitlines():
        if line.startswith("secateur_resident_memory_bytes "):
            return float(line.split()[1])
    return None


async def _one(client: Any, url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    start = time.perf_counter()
    row: dict[str, Any] = {"status": 0, "variant": None, "ttft_s": None, "latency_s": None, "tokens": 0, "error": None}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as r:
            row["status"], row["variant"] = r.status_code, r.headers.get("x-secateur-variant")
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                try:
                    row["error"] = json.loads(text)["error"].get("code") or f"http_{r.status_code}"
                except (ValueError, KeyError, TypeError, AttributeError):
                    row["error"] = f"http_{r.status_code}"
                return row
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    row["error"] = chunk["error"].get("code") or "stream_error"
                    break
                if row["ttft_s"] is None and any(c.get("text") for c in chunk.get("choices") or []):
                    row["ttft_s"] = time.perf_counter() - start
                if chunk.get("usage"):
                    row["tokens"] = int(chunk["usage"].get("completion_tokens", 0))
            if not done and row["error"] is None:
                row["error"] = "incomplete_stream"
    except Exception as exc:  # noqa: BLE001 - counted as an error of its kind, the load goes on
        row["error"] = type(exc).__name__
    row["latency_s"] = time.perf_counter() - start
    return row


async def _load(url: str, model: str, requests: int, concurrency: int, duration_s: float, max_tokens: int,
                timeout_s: float, on_done: Optional[Callable[[int], Any]], temperature: float) -> dict[str, Any]:
    import httpx

    window = min(500, max(1, requests // 4))
    rows: list[dict[str, Any]] = []
    rss: dict[str, Optional[float]] = {}
    hooks: list[asyncio.Task[Any]] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        rss["start"] = await _rss(client, url)
        started_at, began = time.time(), time.perf_counter()
        stop_sending = began + duration_s

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < stop_sending:
                i = sent
                sent += 1
                body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": temperature, "seed": i, "stream": True,
                        "stream_options": {"include_usage": True}}
                sent_at = time.perf_counter() - began
                row = await _one(client, url, body, timeout_s)
                row["sent"], row["done"], row["sent_s"] = i, len(rows), sent_at
                rows.append(row)
                n = len(rows)
                if n == window:
                    rss["after_first_window"] = await _rss(client, url)
                if n == requests - window and requests > window:
                    rss["before_last_window"] = await _rss(client, url)
                if on_done is not None:
                    hooks.append(asyncio.create_task(asyncio.to_thread(on_done, n)))

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=duration_s + timeout_s + 5)
        for task in pending:  # bounded whatever happens: abandon what outlived the budget
            task.cancel()
        wall = time.perf_counter() - began
        if hooks:
            await asyncio.gather(*hooks, return_exceptions=True)
        rss["end"] = await _rss(client, url)
    return _summary(rows, rss, wall, window, {"url": url, "model": model, "requests": requests,
                                               "concurrency": concurrency, "duration_s": duration_s,
                                               "max_tokens": max_tokens, "temperature": temperature,
                                               "abandoned": len(pending), "sent": sent,
                                               "started_at": started_at})


def _summary(rows: list[dict[str, Any]], rss: dict[str, Optional[float]], wall: float, window: int,
             settings: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in rows if r["error"] is None and r["status"] == 200]
    errors: dict[str, int] = {}
    for r in rows:
        if r not in ok:
            errors[str(r["error"])] = errors.get(str(r["error"]), 0) + 1
    latency = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    share: dict[str, int] = {}
    for r in ok:
        share[str(r["variant"])] = share.get(str(r["variant"]), 0) + 1
    middle = (rss.get("after_first_window"), rss.get("before_last_window"))
    growth = None
    if middle[0] and rss.get("end"):
        growth = rss["end"] / middle[0] - 1.0
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {
        "settings": {**settings, "window": window},
        "answered": len(rows), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": errors,
        "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
        "latency_ms": {f"p{p}": ms(_percentile(latency, p)) for p in (50, 95, 99)},
        "ttft_ms": {f"p{p}": ms(_percentile(ttft, p)) for p in (50, 95, 99)},
        "share": {k: round(v / len(ok), 4) for k, v in sorted(share.items())} if ok else {},
        "rss_bytes": rss, "rss_growth": None if growth is None else round(growth, 4),
        # [seconds after the start when it was sent, who answered], in sending order
        "timeline": [[round(r["sent_s"], 4), r["variant"]] for r in sorted(rows, key=lambda r: r["sent"])],
    }


def run_load(url: str = "http://127.0.0.1:8000", *, model: str, requests: int = 200, concurrency: int = 8,
             duration_s: float = 60.0, max_tokens: int = 32, timeout_s: float = 60.0, temperature: float = 0.0,
             on_done: Optional[Callable[[int], Any]] = None) -> dict[str, Any]:
    """Run the bounded load (see the module text) and return its summary."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname is None:
        raise SecateurError(f"bench-serve needs an http URL such as http://127.0.0.1:8000, got {url!r}")
    if parsed.hostname not in LOOPBACK and not parsed.hostname.startswith("127."):
        raise SecateurError(f"bench-serve loads a gateway on this machine only (127.0.0.1, localhost, ::1); got host "
                            f"{parsed.hostname!r}")
    for name, value, low, high in (("requests", requests, 1, 1_000_000), ("concurrency", concurrency, 1, 1024),
                                   ("max_tokens", max_tokens, 1, 1 << 16)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SecateurError(f"--{name.replace('_', '-')} must be a whole number in [{low}, {high}], got {value!r}")
    for name, value in (("duration", duration_s), ("timeout", timeout_s)):
        if not (isinstance(value, (int, float)) and 0 < value <= 86400 and math.isfinite(value)):
            raise SecateurError(f"--{name} must be a number of seconds in (0, 86400], got {value!r}")
    base = url.rstrip("/")
    return asyncio.run(_load(base, model, requests, concurrency, float(duration_s), max_tokens, float(timeout_s),
                             on_done, temperature))


def table(result: dict[str, Any], title: str = "bench-serve") -> list[list[Any]]:
    """Rows (what, value) for a printed table."""
    s, lat, ttft, rss = result["settings"], result["latency_ms"], result["ttft_ms"], result["rss_bytes"]
    mb = lambda v: "-" if v is None else f"{v / 2 ** 20:.1f} MiB"  # noqa: E731
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return [
        ["requests (ok / answered / sent)", f"{result['ok']} / {result['answered']} / {s['sent']}"],
        ["concurrency", s["concurrency"]],
        ["errors", f"{result['errors']} {result['error_kinds'] or ''}".strip()],
        ["wall", f"{result['wall_s']:.2f} s"],
        ["requests/s", fmt(result["requests_per_s"])],
        ["generated tokens/s", fmt(result["tokens_per_s"])],
        ["latency p50 / p95 / p99", f"{fmt(lat['p50'])} / {fmt(lat['p95'])} / {fmt(lat['p99'])} ms"],
        ["first token p50 / p95 / p99", f"{fmt(ttft['p50'])} / {fmt(ttft['p95'])} / {fmt(ttft['p99'])} ms"],
        ["share per variant", ", ".join(f"{k}: {v:.1%}" for k, v in result["share"].items()) or "-"],
        ["server RSS start / end", f"{mb(rss.get('start'))} / {mb(rss.get('end'))}"],
        [f"RSS growth after first {s['window']} to end",
         "-" if result["rss_growth"] is None else f"{result['rss_growth']:+.2%}"],
    ]


__all__ = ["run_load", "table", "PROMPTS"]
