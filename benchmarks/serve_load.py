"""The serving gateway under load: issue 24's bars on a registered stories260K family.

A temporary registry gets family ``stories``: the dense stories260K (``base``) and an RTN W8 per
channel variant made with secateur's API (``w8``); alias ``live`` -> ``w8``. ``secateur serve``
runs it as a child process on 127.0.0.1 (serve.yaml: tier ``small: live``, admin API on,
``refresh_s`` 0.5, ``unload_idle_s`` 0). Then, with ``secateur bench-serve``'s load generator
(:func:`secateur.serve.bench.run_load`: streamed completions, ``--max-tokens`` each, greedy):

1. ``--requests`` requests at 32 concurrent clients; after half of them are answered the alias
   ``live`` is moved to ``base`` in the registry (as ``secateur registry alias`` would), and the
   load goes on;
2. ``--requests`` requests at 1 client.

Bars: 0 errors in both runs; the server's RSS grows under 10% between the first and the last 500
requests of the 32-client run; generated tokens/s at 32 clients at least 4x that at 1; after the
swap every request is answered by ``base`` (the variant-id header) and ``w8`` has been unloaded.

    python benchmarks/serve_load.py [--requests 2000] [--max-tokens 32] [--out PATH]

Prints the tables (naming the CPU) and writes benchmarks/results/serve_load.json. Check it at a
small size (``--requests 50``) on a busy machine; the figures mean something at the full size.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, environment, print_table, setup_env, write_json  # noqa: E402

STORIES = SHARED / "models" / "stories260K" / "hf"
TOKEN = "serve-load-benchmark-admin-token"


def make_family(home: Path, work: Path) -> dict[str, str]:
    import secateur
    from secateur import artifacts
    from secateur.registry import Registry

    base = artifacts.load(STORIES)
    base_dir = secateur.save(base.model, work / "stories-base", tokenizer=base.tokenizer)
    quant = artifacts.load(base_dir)
    secateur.compress_(quant.model, secateur.RTNConfig(bits=8, strategy="channel"))
    w8_dir = secateur.save(quant.model, work / "stories-w8", tokenizer=quant.tokenizer)
    with Registry(home) as registry:
        b = registry.add(base_dir, family="stories", name="base")
        w = registry.add(w8_dir, family="stories", name="w8")
        registry.set_alias("stories", "live", w.id)
    return {"base": b.id, "w8": w.id}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path, work: Path) -> tuple[subprocess.Popen, str, object]:
    import httpx

    port = free_port()
    config = work / "serve.yaml"
    config.write_text("tiers: {small: live}\nrefresh_s: 0.5\nunload_idle_s: 0\n"
                      "batching: {window_ms: 3, max_batch: 32}\n"
                      "limits: {max_concurrency: 128, timeout_s: 120}\n"
                      f"admin: {{enabled: true, token: {TOKEN}}}\naccess_log: {work / 'access.jsonl'}\n")
    log = open(work / "server.log", "wb")
    env = {**os.environ, "SECATEUR_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "secateur.cli", "serve", "stories", "--config", str(config),
                             "--home", str(home), "--port", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("error: the server was not ready after 120 s")


def state(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/admin/state", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=900.0, help="seconds after which a run sends no more")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    from secateur.registry import Registry
    from secateur.serve.bench import run_load, table

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        home = work / "home"
        ids = make_family(home, work)
        proc, url, log = start_server(home, work)
        try:
            run_load(url, model="small", requests=8, concurrency=4, max_tokens=4)  # warm up, not reported
            swap = {"at": None, "done": None}
            half = args.requests // 2

            def on_done(n: int) -> None:
                if n == half:
                    swap["at"] = time.time()
                    with Registry(home) as registry:
                        registry.set_alias("stories", "live", ids["base"])
                    swap["done"] = n

            many = run_load(url, model="small", requests=args.requests, concurrency=args.concurrency,
                            duration_s=args.duration, max_tokens=args.max_tokens, on_done=on_done)
            one = run_load(url, model="small", requests=args.requests, concurrency=1, duration_s=args.duration,
                           max_tokens=args.max_tokens)
            end = time.monotonic() + 5  # a poll (0.5 s) at the latest unloads what nothing points at
            while ids["w8"] in {v for v, s in state(url)["variants"].items() if s["loaded"]} and time.monotonic() < end:
                time.sleep(0.1)
            after_swap = state(url)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    timeline = many.pop("timeline")
    one.pop("timeline")
    # requests sent more than one refresh period (0.5 s) and a margin (1 s) after the move must all be base's
    moved = swap["at"] - many["settings"]["started_at"] if swap["at"] else None
    tail = [v for t, v in timeline if moved is not None and t > moved + 1.5]
    ratio = (many["tokens_per_s"] or 0) / one["tokens_per_s"] if one["tokens_per_s"] else None
    loaded_after = {v for v, s in after_swap.get("variants", {}).items() if s.get("loaded")}
    bars = {
        "errors_0": many["errors"] == 0 and one["errors"] == 0,
        "rss_growth_under_10pct": many["rss_growth"] is not None and many["rss_growth"] < 0.10,
        "throughput_32_at_least_4x_1": ratio is not None and ratio >= 4.0,
        "swap_reached_new_requests": bool(tail) and set(tail) == {ids["base"]},
        "old_variant_unloaded": ids["w8"] not in loaded_after,
    }
    rows = [[what, str(a), str(b)] for (what, a), (_, b) in zip(table(many), table(one))]
    print_table(f"secateur serve on stories260K: {args.requests} requests, {args.max_tokens} tokens each",
                ["measure", f"{args.concurrency} concurrent (alias swap at {half})", "1 concurrent"], rows)
    print_table("bars", ["bar", "met", "value"], [
        ["0 errors", str(bars["errors_0"]), f"{many['errors']} + {one['errors']}"],
        ["RSS growth < 10% (first to last window)", str(bars["rss_growth_under_10pct"]), f"{many['rss_growth']}"],
        [f"tokens/s at {args.concurrency} >= 4x at 1", str(bars["throughput_32_at_least_4x_1"]),
         "-" if ratio is None else f"{ratio:.2f}x"],
        ["after the swap: every answer from base", str(bars["swap_reached_new_requests"]),
         f"{len(tail)} sent 1.5 s after it: {sorted(set(tail))}"],
        ["w8 unloaded after the swap", str(bars["old_variant_unloaded"]), f"loaded: {sorted(loaded_after)}"],
    ])
    path = write_json("serve_load", {"environment": environment(), "requests": args.requests,
                                     "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                                     "variants": ids, "swap_after": half, "many": many, "one": one,
                                     "ratio_tokens_per_s": ratio, "bars": bars, "state_after_swap": after_swap},
                      args.out)
    print(f"wrote {path}")
    sys.exit(0 if all(bars.values()) else 1)


if __name__ == "__main__":
    main()
