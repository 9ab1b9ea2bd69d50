"""A realistic family for the report tests: stories260K (5 blocks of width 64) and six variants
in three generations (distill -> prune -> quantize, a GPTQ W4 of the base, and two rejected ones),
with the numbers a pipeline run on a 2-core machine gives. Built by hand: measuring real speed
in a test would take minutes."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (172, 64), "mlp.up_proj": (172, 64),
          "mlp.down_proj": (64, 172)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _layers(blocks: int, sparsity: float = 0.0, bits: int = 32, skip_bits: tuple[str, ...] = ()) -> dict[str, Any]:
    names = [f"model.layers.{b}.{k}" for b in range(blocks) for k in KINDS]
    out_sparsity, out_bits = {}, {}
    for i, name in enumerate(names):
        # pruning methods spread sparsity unevenly: later blocks and the MLP take more
        wobble = 0.04 * ((i * 7) % 5 - 2) if sparsity else 0.0
        out_sparsity[name] = round(min(max(sparsity + wobble, 0.0), 1.0), 4)
        out_bits[name] = 32 if any(s in name for s in skip_bits) else bits
    out_sparsity["lm_head"], out_bits["lm_head"] = 0.0, 32
    return {"sparsity": out_sparsity, "bits": out_bits}


def _card(name: str, steps: list[dict[str, Any]], weights: int, sparsity: float, blocks: int,
          quant_bits: int | None = None, storage: str = "dense") -> dict[str, Any]:
    params = 260_000 - (5 - blocks) * 46_000
    history = []
    for i, step in enumerate(steps):
        result: dict[str, Any] = {}
        if step["method"] in ("sparsegpt", "magnitude", "wanda"):
            result = {"layers": {f"model.layers.{b}.{k}": {"sparsity": step.get("sparsity", 0.5), "error": 0.01 * b}
                                 for b in range(blocks) for k in KINDS}}
        elif step["method"] == "distill":
            result = {"final_loss": 1.92, "steps": step.get("steps")}
        history.append({"step": step, "seconds": round(3.5 + 7.25 * i, 2),
                        "data_fingerprint": {"source": "tinystories", "samples": 128, "seq_len": 256,
                                             "sha256": _sha("tinystories")[:16]},
                        "result": result})
    card: dict[str, Any] = {
        "format_version": 1, "secateur_version": "0.1.0", "created": "2026-07-01T10:00:00Z",
        "base_model": {"name": "stories260K", "path": "../shared/models/stories260K/hf",
                       "weights_sha256": _sha("stories260K"), "model_type": "llama"},
        "model": {"model_type": "llama", "class": "LlamaForCausalLM", "dtype": "float32"},
        "recipe": {"steps": steps}, "history": history,
        "data_fingerprints": [h["data_fingerprint"] for h in history][:1],
        "metrics": {},
        "sparsity": {"fraction": sparsity, "zeros": int(sparsity * params), "weights": params,
                     "block_fraction": sparsity, "parameters": params},
        "layout": None,
        "environment": {"python": "3.11.2", "torch": "2.13.0", "machine": "x86_64", "torch_threads": 2},
        "extra": {},
        "files": {"model.safetensors": {"bytes": weights, "sha256": _sha(name + "w")},
                  "config.json": {"bytes": 712, "sha256": _sha(name + "c")},
                  "compression.json": {"bytes": 4100, "sha256": _sha(name + "j")}},
        "weights_sha256": _sha(name + "weights"),
        "storage": {"format": storage, "ratio": 1.0 if storage == "dense" else 0.62},
    }
    if quant_bits:
        layers = {f"model.layers.{b}.{k}": {"bits": quant_bits, "group_size": None, "strategy": "channel",
                                            "symmetric": True, "format": "pack-quantized", "type": "int"}
                  for b in range(blocks) for k in KINDS}
        card["quantization"] = {"format": "compressed-tensors", "compression_format": "pack-quantized",
                                "modules": len(layers), "bits": {str(quant_bits): len(layers)}, "layers": layers}
    card["card_sha256"] = _sha(name + "card")
    return card


def _ppl(value: float, data: str = "tinystories") -> dict[str, Any]:
    return {"task": "perplexity", "metric": "perplexity", "value": value, "protocol": "P1",
            "spec": {"task": "perplexity", "data": data},
            "settings": {"data": data, "windows": 64, "seq_len": 256, "threads": 2}}


def _speed(step_ms: float, prefill_ms: float, rss: float) -> dict[str, Any]:
    return {"prefill_ms_median": prefill_ms, "prefill_ms_p95": round(prefill_ms * 1.18, 3),
            "prefill_ms_p99": round(prefill_ms * 1.41, 3),
            "decode_step_ms_median": step_ms, "decode_step_ms_p95": round(step_ms * 1.12, 3),
            "decode_step_ms_p99": round(step_ms * 1.37, 3), "decode_tokens_per_s": round(1000 / step_ms, 1),
            "peak_rss_mib": rss,
            "settings": {"threads": 2, "runtime": "eager", "protocol": "P4", "prompt_len": 128, "new_tokens": 32}}


def _verdict(gate: str, kind: str, passed: bool, value: float, limit: float, unit: str) -> dict[str, Any]:
    return {"gate": gate, "kind": kind, "passed": passed, "value": value, "limit": limit, "unit": unit,
            "reference": {"against": "base"}, "evidence": {"protocol": "P1"}}


def make_family() -> dict[str, Any]:
    quality_base = "perplexity(tinystories) drop <= 40% vs base"
    size_gate = "weights on disk <= 1,100,000 bytes"
    base = {"name": "base", "id": "v-0b7e", "parent": None, "status": "base", "aliases": [],
            "recipe": {"steps": []}, "card": _card("base", [], 1_043_456, 0.0, 5),
            "evaluations": [_ppl(3.66)], "speed": _speed(2.91, 4.8, 182.0), "verdicts": [],
            "bytes": 1_043_456, "layers": _layers(5)}
    distill = [{"method": "structured", "drop_layers": 1, "mlp": 0.0},
               {"method": "distill", "data": ["tinystories:calibration"], "steps": 300, "lr": 0.002,
                "temperature": 1.0}]
    sparse = [{"method": "sparsegpt", "sparsity": 0.3}]
    w8 = [{"method": "rtn", "bits": 8, "strategy": "channel"}]
    variants = [
        {"name": "student", "id": "v-5c1a", "parent": "base", "status": "admitted", "aliases": ["fast"],
         "recipe": {"steps": distill}, "card": _card("student", distill, 858_112, 0.0, 4),
         "evaluations": [_ppl(4.12)], "speed": _speed(2.38, 3.9, 176.0),
         "verdicts": [_verdict(quality_base, "quality", True, 12.57, 40, "%"),
                      _verdict(size_gate, "max_bytes", True, 858_112, 1_100_000, "bytes"),
                      _verdict("decode speedup >= 1.05x vs base (eager)", "speed", True, 1.2227, 1.05, "x")],
         "bytes": 858_112, "layers": _layers(4)},
        {"name": "student-sparse", "id": "v-91d0", "parent": "student", "status": "admitted", "aliases": [],
         "recipe": {"steps": sparse}, "card": _card("student-sparse", sparse, 612_480, 0.3, 4, storage="bitmask-v1"),
         "evaluations": [_ppl(4.31)], "speed": _speed(2.35, 3.8, 170.0),
         "verdicts": [_verdict(quality_base, "quality", True, 17.76, 40, "%"),
                      _verdict(size_gate, "max_bytes", True, 612_480, 1_100_000, "bytes"),
                      _verdict("perplexity drop <= 10% vs parent", "quality", True, 4.61, 10, "%")],
         "bytes": 612_480, "layers": _layers(4, sparsity=0.3)},
        {"name": "student-sparse-w8", "id": "v-a3f2", "parent": "student-sparse", "status": "admitted",
         "aliases": ["small"], "recipe": {"steps": w8},
         "card": _card("student-sparse-w8", w8, 318_944, 0.3, 4, quant_bits=8),
         "evaluations": [_ppl(4.33)], "speed": _speed(1.96, 3.1, 151.0),
         "verdicts": [_verdict(quality_base, "quality", True, 18.31, 40, "%"),
                      _verdict(size_gate, "max_bytes", True, 318_944, 1_100_000, "bytes"),
                      _verdict("perplexity drop <= 2% vs parent", "quality", True, 0.46, 2, "%"),
                      _verdict("weights on disk <= 500,000 bytes", "max_bytes", True, 318_944, 500_000, "bytes")],
         "bytes": 318_944, "layers": _layers(4, sparsity=0.3, bits=8)},
        {"name": "gptq-w4", "id": "v-e77b", "parent": "base", "status": "admitted", "aliases": ["smallest"],
         "recipe": {"steps": [{"method": "gptq", "bits": 4, "strategy": "channel"}]},
         "card": _card("gptq-w4", [{"method": "gptq", "bits": 4, "strategy": "channel"}], 201_216, 0.0, 5,
                       quant_bits=4),
         "evaluations": [_ppl(3.97)], "speed": _speed(2.64, 4.4, 160.0),
         "verdicts": [_verdict(quality_base, "quality", True, 8.47, 40, "%"),
                      _verdict(size_gate, "max_bytes", True, 201_216, 1_100_000, "bytes"),
                      _verdict("weights on disk <= 300,000 bytes", "max_bytes", True, 201_216, 300_000, "bytes")],
         "bytes": 201_216, "layers": _layers(5, bits=4)},
        {"name": "magnitude-70", "id": "v-2c44", "parent": "student", "status": "rejected", "aliases": [],
         "recipe": {"steps": [{"method": "magnitude", "sparsity": 0.7}]},
         "card": _card("magnitude-70", [{"method": "magnitude", "sparsity": 0.7}], 421_760, 0.7, 4,
                       storage="bitmask-v1"),
         "evaluations": [_ppl(9.84)], "speed": _speed(2.33, 3.8, 168.0),
         "verdicts": [_verdict(quality_base, "quality", False, 168.85, 40, "%"),
                      _verdict(size_gate, "max_bytes", True, 421_760, 1_100_000, "bytes")],
         "bytes": 421_760, "layers": _layers(4, sparsity=0.7)},
        {"name": "w4-student-g16", "id": "v-6b09", "parent": "student", "status": "rejected", "aliases": [],
         "recipe": {"steps": [{"method": "rtn", "bits": 4, "group_size": 16}]},
         "card": _card("w4-student-g16", [{"method": "rtn", "bits": 4, "group_size": 16}], 236_032, 0.0, 4,
                       quant_bits=4),
         "evaluations": [_ppl(4.29)], "speed": _speed(2.97, 4.9, 158.0),
         "verdicts": [_verdict(quality_base, "quality", True, 17.21, 40, "%"),
                      _verdict("decode speedup >= 1.1x vs base (eager)", "speed", False, 0.9798, 1.1, "x")],
         "bytes": 236_032, "layers": _layers(4, bits=4, skip_bits=("down_proj",))},
    ]
    return {"family": "stories", "created": "2026-07-01 10:04 UTC",
            "machine": {"cpu": "Intel Xeon (2 cores)", "threads": 2, "torch": "2.13.0"},
            "base": base, "variants": variants}


@pytest.fixture
def family() -> dict[str, Any]:
    return copy.deepcopy(make_family())


EXIT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def exit_variant(name: str = "exits") -> dict[str, Any]:
    """A variant with exit heads: its early_exit step's curve in the card (perplexity on the held-out
    split against mean blocks) and the speed evaluation's exit_curve for five of its thresholds."""
    step = {"method": "early_exit", "confidence": "classifier", "tune_backbone": True}
    card = _card(name, [step], 1_060_000, 0.0, 5)
    points = [{"threshold": None, "mean_blocks": 5.0, "nll": 1.41, "perplexity": 4.1, "increase_pct": 0.0, "exits": {}}]
    for i, t in enumerate(EXIT_THRESHOLDS):
        blocks = 3.6 + 0.2 * i
        ppl = 4.1 * (1 + 0.3 * (5.0 - blocks) ** 2 / 2)
        points.append({"threshold": t, "mean_blocks": blocks, "nll": 1.4, "perplexity": ppl,
                       "increase_pct": 100 * (ppl / 4.1 - 1), "exits": {"2": 10 * i, "3": 5}})
    card["history"][0]["result"] = {"exits": {"exits_after_blocks": [1, 2, 3, 4]},
                                    "curve": {"data": "held-out split of the training text: 8 windows of 256 tokens",
                                              "metric": "perplexity", "higher_is_better": False, "blocks": 5,
                                              "confidence": "classifier", "unit": "blocks per token", "points": points}}
    speed = _speed(2.95, 4.8, 185.0)
    speed["exit_curve"] = [{"threshold": t, "tokens_per_s": 300 + 20 * i, "speedup": 1.25 - 0.08 * i,
                            "mean_blocks": 3.7 + 0.25 * i} for i, t in enumerate(EXIT_THRESHOLDS[:5])]
    return {"name": name, "id": "v-ee01", "parent": "base", "status": "admitted", "aliases": [],
            "recipe": {"steps": [step]}, "card": card, "evaluations": [_ppl(3.71)], "speed": speed, "verdicts": [],
            "bytes": 1_060_000, "layers": _layers(5)}


@pytest.fixture
def exits() -> Any:
    """``EXIT_THRESHOLDS`` and ``exit_variant`` for the tests (a fixture: a plain ``from conftest
    import`` finds whichever directory's conftest Python imported first in a whole-suite run)."""
    from types import SimpleNamespace

    return SimpleNamespace(EXIT_THRESHOLDS=EXIT_THRESHOLDS, exit_variant=exit_variant)
