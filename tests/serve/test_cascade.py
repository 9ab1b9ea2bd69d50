"""The confidence cascade end to end on the stories260K family over HTTP: thresholds calibrated on
calibration-split prompts (`secateur route-calibrate`), a gateway whose serve.yaml reads them, and
held-out prompts routed through it. A routed answer escalates to the large tier exactly when the
small tier's own answer to the prompt (asked pinned, with its log-probabilities) has a confidence
under the threshold; an escalated answer is the large tier's; headers, access log and metrics say so."""

from __future__ import annotations

import json

import httpx
import pytest

from secateur.serve.policy import confidence
from secateur.serve.routing import story_prompts

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def calibration(serve_home, tmp_path_factory):
    from secateur.serve.routing import calibrate_cascade

    out = tmp_path_factory.mktemp("cascade") / "cascade.json"
    config = tmp_path_factory.mktemp("cascade-config") / "serve.yaml"
    config.write_text("tiers: {small: fast, large: best}\n", encoding="utf-8")
    result = calibrate_cascade("stories", config, target_rate=0.5, quantile=0.1, prompts=40, max_tokens=MAX_TOKENS,
                               home=serve_home, out=out)
    return out, result


def test_calibration_hits_its_target_on_the_calibration_prompts(calibration):
    path, result = calibration
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["order"] == ["small", "large"] and len(saved["thresholds"]) == 1
    tier = saved["tiers"][0]
    assert tier["prompts"] == 40 and tier["escalated"] == 20  # round(0.5 x 40)
    assert tier["score_min"] < saved["thresholds"][0] < tier["score_max"] <= 0


def test_route_calibrate_cli_writes_the_file(capsys, serve_home, tmp_path):
    from secateur.testing import run_cli

    config = tmp_path / "serve.yaml"
    config.write_text("tiers: {small: fast, large: best}\n", encoding="utf-8")
    out = tmp_path / "c.json"
    code, stdout, err = run_cli(capsys, "route-calibrate", "stories", "--config", str(config), "--home",
                                str(serve_home), "--target-rate", "0.25", "--prompts", "8", "--max-tokens", "4",
                                "--out", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["tiers"][0]["escalated"] == 2 and "threshold" in stdout


def test_cascade_routes_held_out_prompts_over_http(calibration, launch, stories_dir):
    from transformers import AutoTokenizer

    path, result = calibration
    threshold = result["thresholds"][0]
    server = launch("stories", f"tiers: {{small: fast, large: best}}\npolicy: {{kind: cascade, calibration: {path}}}\n")
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    prompts = [p.prompt for p in story_prompts(tokenizer, "evaluation", 16)]
    escalated = 0
    try:
        for ids in prompts:  # one at a time: each runs alone, as its pinned twin does, so the numbers are equal
            ask = {"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0}
            small = httpx.post(f"{server.url}/v1/completions", json={**ask, "model": "small", "logprobs": 1}).json()
            score = confidence(small["choices"][0]["logprobs"]["token_logprobs"], result["quantile"])
            routed = httpx.post(f"{server.url}/v1/completions", json={**ask, "model": "stories"})
            assert routed.status_code == 200, routed.text
            if score < threshold:
                escalated += 1
                assert (routed.headers["x-secateur-tier"], routed.headers["x-secateur-decision"]) == ("large",
                                                                                                       "escalated")
                large = httpx.post(f"{server.url}/v1/completions", json={**ask, "model": "large"}).json()
                assert routed.json()["choices"][0]["text"] == large["choices"][0]["text"]
            else:
                assert (routed.headers["x-secateur-tier"], routed.headers["x-secateur-decision"]) == ("small",
                                                                                                       "cascade")
                assert routed.json()["choices"][0]["text"] == small["choices"][0]["text"]
        assert 0 < escalated < len(prompts)
        lines = server.access_lines(until=lambda ls: sum(x.get("decision") == "escalated" for x in ls) >= escalated)
        assert sum(x.get("decision") == "escalated" and x.get("tier") == "large" for x in lines) == escalated
        metrics = httpx.get(f"{server.url}/metrics").text
        assert (f'secateur_escalations_total{{decision="escalated",from_tier="small",to_tier="large"}} '
                f'{float(escalated)}') in metrics
        # a streamed routed request is answered by the first tier, labelled so
        with httpx.stream("POST", f"{server.url}/v1/completions",
                          json={"model": "stories", "prompt": "Once", "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-secateur-decision"] == "cascade-stream"
            assert r.headers["x-secateur-tier"] == "small"
            list(r.iter_lines())
    finally:
        server.stop()


def test_route_eval_curve_at_a_tiny_size(capsys, serve_home, tmp_path):
    """The curve's ends are the two tiers (nothing escalated: the small one's perplexity and cost;
    everything: the large one's perplexity at both costs); APGR is an area in [0, 1]."""
    from secateur.testing import run_cli

    config = tmp_path / "serve.yaml"
    config.write_text("tiers: {small: fast, large: best}\n", encoding="utf-8")
    out = tmp_path / "curve.json"
    code, stdout, err = run_cli(capsys, "route-eval", "stories", "--config", str(config), "--home", str(serve_home),
                                "--calibration-prompts", "12", "--eval-prompts", "12", "--max-tokens", "4",
                                "--batch", "4", "--out", str(out))
    assert code == 0, err
    assert "APGR" in stdout
    data = json.loads(out.read_text())
    first, last = data["curve"][0], data["curve"][-1]
    assert (first["target_rate"], first["escalated"], last["target_rate"], last["escalated"]) == (0.0, 0.0, 1.0, 1.0)
    assert first["perplexity"] == pytest.approx(data["small"]["perplexity"])
    assert last["perplexity"] == pytest.approx(data["large"]["perplexity"])
    assert first["cost_s"] == pytest.approx(data["small"]["cost_s"])
    assert last["cost_s"] == pytest.approx(data["small"]["cost_s"] + data["large"]["cost_s"])
    assert data["prompts"] == {"calibration": 12, "evaluation": 12}
    assert 0.0 <= data["apgr"] <= 1.0
    thresholds = [c["threshold"] for c in data["curve"]]
    assert thresholds == sorted(thresholds)
