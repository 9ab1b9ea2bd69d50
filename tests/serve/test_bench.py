"""`secateur bench-serve` against a real gateway, at a tiny size: every request counted with its
variant, percentiles in order, tokens as asked, the server's RSS read; errors are counted by kind
(never raised); a duration bound stops a run that asked for far more requests; non-loopback URLs
are refused."""

from __future__ import annotations

import json

import pytest

from secateur.errors import SecateurError
from secateur.serve.bench import run_load


def test_bench_serve_counts_everything(stories_server):
    seen: list[int] = []
    result = run_load(stories_server.url, model="stories", requests=24, concurrency=4, max_tokens=4,
                      on_done=seen.append)
    assert (result["ok"], result["answered"], result["errors"]) == (24, 24, 0)
    assert sorted(seen) == list(range(1, 25))
    assert result["tokens"] == 24 * 4
    assert all(k.startswith("v-") for k in result["share"])  # variant ids
    assert len(result["share"]) == 2 and sum(result["share"].values()) == pytest.approx(1.0)  # static 1:1
    for key in ("latency_ms", "ttft_ms"):
        p = result[key]
        assert 0 < p["p50"] <= p["p95"] <= p["p99"]
    assert result["ttft_ms"]["p50"] <= result["latency_ms"]["p99"]
    rss = result["rss_bytes"]
    assert all(rss[k] and rss[k] > 1e7 for k in ("start", "after_first_window", "before_last_window", "end"))
    assert result["rss_growth"] is not None


def test_bench_serve_counts_errors_and_stops_at_its_duration(stories_server):
    bad = run_load(stories_server.url, model="nope", requests=6, concurrency=2, max_tokens=2)
    assert bad["ok"] == 0 and bad["errors"] == 6 and bad["error_kinds"] == {"model_not_found": 6}
    bounded = run_load(stories_server.url, model="small", requests=1_000_000, concurrency=2, max_tokens=2,
                       duration_s=0.5)
    assert 0 < bounded["answered"] < 1_000_000 and bounded["errors"] == 0


def test_bench_serve_refuses_other_hosts_and_bad_numbers():
    with pytest.raises(SecateurError, match="this machine only"):
        run_load("http://example.com:8000", model="x")
    with pytest.raises(SecateurError, match="--concurrency"):
        run_load("http://127.0.0.1:1", model="x", concurrency=0)


def test_bench_serve_cli_prints_and_writes_json(capsys, stories_server, tmp_path):
    from secateur.testing import run_cli

    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench-serve", stories_server.url, "--model", "small", "-n", "8", "-c", "2",
                                "--max-tokens", "3", "--out", str(out))
    assert code == 0, err
    assert "generated tokens/s" in stdout and "latency p50" in stdout
    data = json.loads(out.read_text())
    assert data["ok"] == 8 and data["tokens"] == 24 and data["settings"]["concurrency"] == 2
