"""Cheap proxies: rank every candidate before building any, so measurement is spent on the promising.

**Quality** (per-block sensitivity, as ``mixed`` measures per-layer sensitivity): on a few calibration
windows, the loss of the base model (causal: the language-model loss; encoder: 1 − mean cosine of
the final hidden states with the dense ones) is measured with *one block at a time* given one
weight option — a (sparsity, quantization) pair simulated on that block's projections (sparsity:
the method's score, ``|W|`` or Wanda's ``|W|·‖X_j‖``, per row or N:M; quantization: round to
nearest with the step's scheme). Each structured choice is applied for real (one pass) on a copy
and its loss measured. A candidate's proxy is the structured loss increase plus the sum of its
option's per-block increases over the blocks it keeps: additive, so ``options × blocks`` losses
price every combination. Recovery training is not priced in advance: the proxy of a distilled
candidate is its undistilled twin's, and the measured trials say what recovery buys.

**Latency** (a per-operation cost model, measured once per machine and runtime and cached under
``SECATEUR_HOME/search``): each projection's time at the workload's rows (1 for decode, batch ×
prompt for an encoder) in its scheme (float32 ``nn.Linear``, or the runtime's ``QuantLinear``
with the kernel it picks on this machine), plus the rest of each block (attention, norms,
activations) from the dense model's measured time minus its projections, scaled by the blocks
kept. Sparsity buys no time: secateur has no sparse CPU kernel, and the model says so.

**Bytes**: from the shapes: float32 (sparse weights too: pipelines store the plain format), or
packed integers and scales.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .space import Candidate, SearchSpace, _digest


# --- latency: the per-operation cost model ------------------------------------------------------------
def scheme_of(quant: Optional[dict[str, Any]]) -> str:
    """The runtime scheme a quantization choice runs in: ``fp32``, ``w8a8``, ``fp8`` or ``w{b}a16[g{g}]``."""
    if not quant:
        return "fp32"
    method = quant["method"]
    if method == "smoothquant" or quant.get("activations") == "int8":
        return "w8a8"
    if method == "fp8":
        return "fp8"
    cfg = _config(quant)
    group = cfg.group_size if cfg.strategy == "group" else None
    return f"w{cfg.bits}a16" + (f"g{group}" if group else "")


def _config(step: dict[str, Any]) -> Any:
    from ..recipe import _step_from_dict

    return _step_from_dict(dict(step), "step")


class OpCosts:
    """Seconds of one projection per (scheme, rows, d_in, d_out), measured on first use and cached
    in a JSON file keyed by this machine and torch's version."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path or op_cache_path()
        try:
            self.data: dict[str, float] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def linear_s(self, scheme: str, rows: int, d_in: int, d_out: int) -> float:
        key = f"{scheme}|{rows}|{d_in}|{d_out}"
        if key not in self.data:
            self.data[key] = _time_linear(scheme, rows, d_in, d_out)
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if self.dirty:
            from ..pipeline.run import _write_json

            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.path, self.data)
            self.dirty = False


def op_cache_path() -> Path:
    import torch

    from .. import settings
    from ..runtime import machine

    return settings.home() / "search" / f"ops-{machine.key()}-torch{torch.__version__.split('+')[0]}.json"


def _time_linear(scheme: str, rows: int, d_in: int, d_out: int) -> float:
    """Median seconds of one forward of a projection in ``scheme`` on ``rows`` tokens."""
    import torch

    from ..runtime.linear import QuantLinear

    g = torch.Generator().manual_seed(0)
    if scheme == "fp32" or scheme == "fp8":
        module: Any = torch.nn.Linear(d_in, d_out)
    else:
        bits = int(scheme[1])
        activation = "int8" if scheme == "w8a8" else None
        group = int(scheme.split("g")[1]) if "g" in scheme else None
        if group and d_in % group:
            group = None
        hi = 2 ** (bits - 1) - 1
        q = torch.randint(-hi, hi + 1, (d_out, d_in), generator=g, dtype=torch.int8)
        groups = d_in // group if group else 1
        try:
            module = QuantLinear.from_quantized(q, torch.rand(d_out, groups, generator=g) * 0.01 + 1e-3, None, bits,
                                                group, torch.zeros(d_out), activation)
        except Exception:  # a scheme the runtime cannot hold at this shape: it would run in float32
            module = torch.nn.Linear(d_in, d_out)
    x = torch.randn(rows, d_in, generator=g)
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        start, n = time.perf_counter(), 0
        while n < 5 or time.perf_counter() - start < 0.01:
            module(x)
            n += 1
        per_call = (time.perf_counter() - start) / n
        reps = max(1, int(0.002 / max(per_call, 1e-7)))
        samples = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(reps):
                module(x)
            samples.append((time.perf_counter() - t) / reps)
    return statistics.median(samples)


def workload_rows(space: SearchSpace) -> int:
    s = space.speed
    if s["metric"] == "decode":
        return 1
    if s["metric"] == "prefill":
        return int(s.get("prompt_len") or 128)
    return int(s.get("batch") or 1) * int(s.get("prompt_len") or 32)


def model_linear_s(costs: OpCosts, shape: Any, scheme: str, rows: int) -> float:
    return sum(costs.linear_s(scheme, rows, p.d_in, p.d_out) for p in shape.projections)


def head_s(costs: OpCosts, shape: Any, rows: int) -> float:
    """The output projection of a causal LM (not quantized: the methods ignore lm_head by default)."""
    return costs.linear_s("fp32", rows, shape.hidden, shape.vocab) if shape.kind == "causal" else 0.0


def predict_bytes(shape: Any, dense_shape: Any, sparsity: Optional[dict[str, Any]], quant: Optional[dict[str, Any]]) -> float:
    """Weights on disk: the projections in their storage plus everything else in float32. A
    pipeline stores its artifacts in the plain format (``save(sparse="none")``: any transformers
    release loads them), so sparsity saves no bytes here; quantization packs integers and scales."""
    proj = sum(p.numel for p in shape.projections)
    other = max(shape.params - proj, 0) * 4
    if not quant:
        return other + proj * 4.0
    scheme = scheme_of(quant)
    if scheme in ("w8a8", "fp8"):
        return other + proj * 1.0 + sum(p.d_out * 4 for p in shape.projections)
    bits = int(scheme[1])
    group = int(scheme.split("g")[1]) if "g" in scheme else None
    scales = sum(p.d_out * (p.d_in // group if group and p.d_in % group == 0 else 1) * 4 for p in shape.projections)
    return other + proj * bits / 8 + scales


# --- quality: per-block sensitivity ---------------------------------------------------------------------
def _simulate_sparsity(w: Any, choice: dict[str, Any], col_norm: Any) -> Any:
    import torch

    score = w.abs()
    if choice["method"] != "magnitude" and col_norm is not None:
        score = score * col_norm.sqrt().unsqueeze(0)
    pattern = choice.get("pattern")
    if pattern:
        n, m = (int(x) for x in str(pattern).split(":"))
        rows, cols = w.shape
        if cols % m:
            return w
        grouped = score.reshape(rows, cols // m, m)
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, grouped.topk(n, dim=2).indices, True)
        return w * keep.reshape(rows, cols)
    drop = int(round(float(choice.get("sparsity", 0.5)) * w.shape[1]))
    if drop <= 0:
        return w
    idx = score.topk(drop, dim=1, largest=False).indices
    return w.scatter(1, idx, 0.0)


def _simulate_quant(w: Any, choice: dict[str, Any]) -> Any:
    import torch

    from ..quant.primitives import Scheme, dequantize, quantize_weight, resolve_group

    scheme_name = scheme_of(choice)
    if scheme_name == "fp8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
        return (w / scale).to(torch.float8_e4m3fn).float() * scale
    if scheme_name == "w8a8":
        scheme = Scheme(8, True, "channel", 128)
    else:
        cfg = _config(choice)
        scheme = cfg.scheme
    scheme = resolve_group(w.shape[1], scheme, True)
    q, scale, zero = quantize_weight(w.float(), scheme)
    return dequantize(q, scale, zero, scheme)


@dataclass
class Sensitivity:
    """The measured table the quality proxy reads."""

    dense_loss: float
    blocks: int
    weight: dict[str, list[float]] = field(default_factory=dict)       # option key -> loss increase per block
    structured: dict[str, float] = field(default_factory=dict)         # structured key -> loss increase
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"dense_loss": self.dense_loss, "blocks": self.blocks, "weight": self.weight,
                "structured": self.structured, "seconds": self.seconds}


def option_key(sparsity: Optional[dict[str, Any]], quant: Optional[dict[str, Any]]) -> str:
    return _digest({"sparsity": sparsity, "quant": quant})[:12]


def measure_sensitivity(model: Any, tokenizer: Any, space: SearchSpace, candidates: list[Candidate]) -> Sensitivity:
    """The per-block loss increase of every weight option the candidates use, and the loss increase
    of every structured choice (applied for real on a copy), on ``space.proxy_samples`` windows."""
    import torch

    from ..api import compress_
    from ..calibrate import calibration_loss
    from ..models.arch import arch_of
    from ..models.layers import weight_matrix
    from ..pipeline.recipe_run import calibration_data
    from ..progress import track
    from ..recipe import Recipe
    from ..targets import select_modules

    start = time.perf_counter()
    recipe = Recipe.from_dict({"data": space.data, "steps": [{"method": "magnitude"}]})
    data = calibration_data(recipe, tokenizer)
    ids = getattr(data, "input_ids", data)[: space.proxy_samples]
    facts = arch_of(model)
    arch, kind = facts.arch, facts.arch.kind
    batches = [ids[i:i + 8] for i in range(0, ids.shape[0], 8)]
    model.eval()
    blocks = arch.get_blocks(model)
    linears = [select_modules(block, ("Linear",), ()) for block in blocks]
    # input column norms of every projection (Wanda's ||X_j||^2), one pass
    norms: dict[int, Any] = {}
    hooks = []
    for group in linears:
        for module in group.values():
            def hook(mod: Any, args: Any, _out: Any) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                norms[id(mod)] = norms.get(id(mod), 0) + (x * x).sum(0)
            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        dense, reference = calibration_loss(model, batches, kind)
    for h in hooks:
        h.remove()
    table = Sensitivity(dense_loss=dense, blocks=len(blocks))

    def loss() -> float:
        with torch.inference_mode():
            value = calibration_loss(model, batches, kind, reference if kind != "causal" else None)[0]
        return value - dense if kind == "causal" else value

    options = {}
    for c in candidates:
        if c.sparsity or c.quant:
            options[option_key(c.sparsity, c.quant)] = (c.sparsity, c.quant)
    for key, (sparsity, quant) in track(list(options.items()), "search: sensitivity of each weight option"):
        per_block = []
        for group in linears:
            saved = {name: weight_matrix(m).detach().clone() for name, m in group.items()}
            with torch.no_grad():
                for name, m in group.items():
                    w = saved[name].float()
                    if sparsity:
                        w = _simulate_sparsity(w, sparsity, norms.get(id(m)))
                    if quant:
                        w = _simulate_quant(w, quant)
                    weight_matrix(m).copy_(w.to(saved[name].dtype))
            per_block.append(loss())
            with torch.no_grad():
                for name, m in group.items():
                    weight_matrix(m).copy_(saved[name])
        table.weight[key] = per_block
    structured = {_digest(c.structured)[:12]: c.structured for c in candidates if c.structured}
    for key, choice in track(list(structured.items()), "search: loss of each structured choice"):
        pruned = copy.deepcopy(model)
        try:
            compress_(pruned, Recipe.from_dict({"steps": [{"method": "structured", **choice}]}).steps, data=data,
                      tokenizer=tokenizer)
            with torch.inference_mode():
                value = calibration_loss(pruned, batches, kind, reference if kind != "causal" else None)[0]
            table.structured[key] = value - dense if kind == "causal" else value
        except Exception:  # e.g. a hidden-width cut whose output cannot be compared with the dense states
            table.structured[key] = float("nan")
        del pruned
    table.seconds = round(time.perf_counter() - start, 3)
    return table


# --- every candidate's proxies -----------------------------------------------------------------------------
def predict(space: SearchSpace, candidates: list[Candidate], table: Sensitivity, base_path: str,
            dense_seconds: float, costs: Optional[OpCosts] = None) -> dict[str, dict[str, Any]]:
    """``{candidate id: {loss_delta, latency, speedup, bytes}}``: the proxy of each candidate, latency
    and bytes as ratios to the dense model's (its measured time ``dense_seconds`` at the workload)."""
    from ..planner.shapes import ModelShape
    from ..recipe import Recipe

    costs = costs or OpCosts()
    rows = workload_rows(space)
    dense = ModelShape.of(base_path)
    dense_linear = model_linear_s(costs, dense, "fp32", rows)
    head = head_s(costs, dense, rows)
    rest_per_block = max(dense_seconds - dense_linear - head, 0.0) / max(dense.blocks, 1)
    dense_bytes = predict_bytes(dense, dense, None, None)
    shapes: dict[str, Any] = {}
    out = {}
    for c in candidates:
        skey = _digest(c.structured)[:12] if c.structured else ""
        if skey not in shapes:
            shapes[skey] = dense if not c.structured else dense.after(
                Recipe.from_dict({"steps": [{"method": "structured", **c.structured}]}).steps[0])
        shape = shapes[skey]
        scheme = scheme_of(c.quant)
        seconds = rest_per_block * shape.blocks + model_linear_s(costs, shape, scheme, rows) + head_s(costs, shape, rows)
        kept = shape.blocks / max(dense.blocks, 1)
        delta = table.structured.get(skey, 0.0) if c.structured else 0.0
        if c.sparsity or c.quant:
            delta += kept * sum(table.weight.get(option_key(c.sparsity, c.quant), [0.0]))
        if isinstance(delta, float) and math.isnan(delta):
            delta = float("inf")
        out[c.id] = {"loss_delta": delta, "latency": seconds / max(dense_seconds, 1e-12),
                     "speedup": dense_seconds / max(seconds, 1e-12),
                     "bytes": predict_bytes(shape, dense, c.sparsity, c.quant) / dense_bytes,
                     "blocks": shape.blocks, "scheme": scheme}
    costs.save()
    return out


__all__ = ["OpCosts", "Sensitivity", "measure_sensitivity", "predict", "scheme_of", "predict_bytes", "workload_rows",
           "option_key"]
