"""Probes: real stages on small synthetic models, each in a fresh process, timed and measured.

One entry point runs one stage exactly as a pipeline builds it (load the parent, build the
calibration set, ``compress_`` with a resume folder, save, verify) in a child process and reports
the seconds of each part and the process's peak resident set::

    python -m secateur.planner.probe '{"model": DIR, "steps": [...], "samples": 32, "seq_len": 128}'

Before timing, the child imports the model's family once (a tiny model of the same type), as a
pipeline has done by the time it builds a stage. The cost model uses the probes to measure what
the unit prices cannot: the resident set a stage starts with, how much it grows per byte of
weights loaded, the fixed cost of loading, the transient memory of a calibration batch and of a
training step, and the per-method corrections (measured time / counted time) on two synthetic
Llama models of different widths with random-token calibration data. The planner's benchmark
(``benchmarks/planner_accuracy.py``) uses the same entry on the real models.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

MB = 1 << 20
# the probes' synthetic models (random weights; Llama shapes) and the methods timed on them
PROBE_MODELS = {
    "probe-s": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=1024),
    "probe-m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=2048),
    "probe-load": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=4096),
}
PROBE_STEPS = {
    "magnitude": {"method": "magnitude", "sparsity": 0.5},
    "rtn": {"method": "rtn", "bits": 8, "strategy": "channel"},
    "fp8": {"method": "fp8"},
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "gptq": {"method": "gptq", "bits": 4, "strategy": "group", "group_size": 32},
    "awq": {"method": "awq", "bits": 4, "strategy": "group", "group_size": 32},
    "smoothquant": {"method": "smoothquant"},
    "structured": {"method": "structured", "mlp": 0.5, "drop_layers": 1},
    "distill": {"method": "distill", "steps": 15, "batch_size": 8, "eval_every": 0, "seq_len": 64},
}
PROBE_DATA = (32, 64)   # samples, seq_len of the probes' random-token calibration set


def synthetic_llama(folder: Path, **sizes: Any) -> Path:
    """A random-weight Llama with ``sizes`` saved at ``folder`` (safetensors, float32), with no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **sizes)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


# --- the child ------------------------------------------------------------------------------------
def _warm(model_dir: Path) -> None:
    """Import what loading this model's family imports, on a one-block copy of its config on the
    meta device (no weights read, no memory kept), as a pipeline has done before it builds a stage."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..models.arch import arch_for

    config = AutoConfig.from_pretrained(model_dir)
    arch = arch_for(config.model_type)
    config.num_hidden_layers = 1
    auto = AutoModelForCausalLM if arch.kind == "causal" else AutoModel
    with torch.device("meta"):
        auto.from_config(config)


def run_child(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run each stage of ``spec["stages"]`` (or ``spec`` itself) as the pipeline does, one after
    the other in this process; for each, the seconds of its parts and the peak RSS so far."""
    _warm(Path(spec["model"]))
    return [_one(spec | stage) for stage in spec.get("stages") or [{}]]


def _one(spec: dict[str, Any]) -> dict[str, Any]:
    import shutil

    import torch

    from ..api import compress_
    from ..artifacts import load, save, verify
    from ..recipe import Recipe
    from ..progress import peak_rss_bytes

    model_dir = Path(spec["model"])
    recipe = Recipe.from_dict({"steps": spec["steps"], **({"data": spec["data"]} if spec.get("data") else {})})
    out = Path(spec["out"])
    times: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load(model_dir)
    times["load"] = time.perf_counter() - start
    t = time.perf_counter()
    if spec.get("data"):  # a named source, as a pipeline's data: builds it
        from ..data import calibration_set, source

        d = recipe.data
        data: Any = calibration_set(d.source, loaded.tokenizer, d.samples, d.seq_len, d.seed,
                                    d.mode or source(d.source).default_mode, split=d.split)
    elif spec.get("samples"):
        from ..data import CalibrationSet

        vocab = loaded.model.config.vocab_size
        ids = torch.randint(0, vocab, (spec["samples"], spec["seq_len"]), generator=torch.Generator().manual_seed(0))
        data = CalibrationSet(ids, fingerprint=f"random-{vocab}-{spec['samples']}x{spec['seq_len']}")
    else:
        data = None
    times["calibration data"] = time.perf_counter() - t
    t = time.perf_counter()
    compress_(loaded.model, recipe, data=data, checkpoint_dir=out.parent / (out.name + ".resume"),
              tokenizer=loaded.tokenizer)
    times["compress"] = time.perf_counter() - t
    t = time.perf_counter()
    save(loaded.model, out, tokenizer=loaded.tokenizer, recipe=recipe)
    shutil.rmtree(out.parent / (out.name + ".resume"), ignore_errors=True)
    verify(out)
    times["save"] = time.perf_counter() - t
    return {"seconds": time.perf_counter() - start, "parts": times,
            "peak_rss": peak_rss_bytes(),
            "threads": torch.get_num_threads()}


def run_stage(model: str | Path, steps: list[dict[str, Any]], *, data: Optional[dict[str, Any]] = None,
              samples: int = 0, seq_len: int = 0, timeout: float = 1800.0) -> dict[str, Any]:
    """Run one stage in a fresh process (see :func:`run_child`) and return what it measured."""
    return run_stages(model, [steps], data=data, samples=samples, seq_len=seq_len, timeout=timeout)[0]


def run_stages(model: str | Path, stages: list[list[dict[str, Any]]], *, data: Optional[dict[str, Any]] = None,
               samples: int = 0, seq_len: int = 0, timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Run several stages on ``model`` one after the other in one fresh process: each one's
    seconds are its own; only the first one's peak RSS is its own (a peak never comes down)."""
    from ..errors import SecateurError

    with tempfile.TemporaryDirectory(prefix="secateur-probe-") as tmp:
        spec = {"model": str(model), "data": data, "samples": samples, "seq_len": seq_len,
                "stages": [{"steps": steps, "out": str(Path(tmp) / f"artifact-{i}")} for i, steps in enumerate(stages)]}
        env = {**os.environ, "SECATEUR_PROGRESS": "0"}
        proc = subprocess.run([sys.executable, "-m", "secateur.planner.probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        methods = [s.get("method") for steps in stages for s in steps]
        raise SecateurError(f"planner probe of {methods} on {model} failed: {tail[0]}")
    return json.loads(lines[-1])


# --- fitting the cost model ----------------------------------------------------------------------------
def _folder() -> Path:
    from .. import settings

    return settings.home() / "planner" / "probe-models"


def measure_memory(model: Any) -> Any:
    """Resident set at the start of a stage, growth per byte loaded, the load's fixed cost, and the
    transient multipliers of a calibration batch and a training step, from probe stages."""
    from . import predict
    from .shapes import ModelShape

    small = synthetic_llama(_folder() / "probe-s", **PROBE_MODELS["probe-s"])
    large = synthetic_llama(_folder() / "probe-load", **PROBE_MODELS["probe-load"])
    base = run_stage(small, [PROBE_STEPS["rtn"]])
    heavy = run_stage(large, [PROBE_STEPS["rtn"]])
    s_small, s_large = ModelShape.of(small), ModelShape.of(large)
    # the resident set a stage starts from: the small probe less its (tiny) weights and work
    per_byte = max((heavy["peak_rss"] - base["peak_rss"]) / max(s_large.memory_bytes - s_small.memory_bytes, 1), 0.5)
    model.load_rss_per_byte = per_byte
    model.base_rss["causal"] = base["peak_rss"] - per_byte * s_small.memory_bytes
    model.base_rss.setdefault("encoder", model.base_rss["causal"])
    dt = heavy["parts"]["load"] - base["parts"]["load"]
    read = max(dt / max(s_large.disk_bytes - s_small.disk_bytes, 1), 1e-10)
    model.read_bps = 1.0 / read
    # the first load of a stage's process (a pipeline's stages each load their parent afresh)
    model.load_fixed_s = max(base["parts"]["load"] - s_small.disk_bytes * read, 0.0)
    # transient multipliers: what the measured peak leaves after the counted parts, over the counted transient
    samples, seq = 64, 256
    calib = run_stage(small, [PROBE_STEPS["gptq"]], samples=samples, seq_len=seq)
    est, _ = predict.stage(model, s_small, [_config(PROBE_STEPS["gptq"])], predict.Data(samples, seq))
    batch = est.memory.get("batch", 1.0)
    model.memory["calibrated"] = min(max((calib["peak_rss"] - (est.peak_bytes - batch)) / batch, 0.25), 8.0)
    train_step = {**PROBE_STEPS["distill"], "seq_len": 128}
    train = run_stage(small, [train_step], samples=samples, seq_len=128)
    est, _ = predict.stage(model, s_small, [_config(train_step)], predict.Data(samples, 128))
    kept = est.memory.get("autograd activations", 1.0)
    model.memory["training"] = min(max((train["peak_rss"] - (est.peak_bytes - kept)) / kept, 0.25), 8.0)
    return model


def measure_methods(model: Any) -> Any:
    """Per-method corrections from the real methods on two probe models: measured compress time =
    ``scale`` × counted time + ``per_projection`` × projections (the per-layer bookkeeping a count
    of operations misses), solved exactly from the two (non-negative; one scale if not). Also the
    fixed cost of a save, the median over every probe stage."""
    import statistics

    from ..progress import track
    from . import predict
    from .shapes import ModelShape

    samples, seq = PROBE_DATA
    points: dict[str, list[tuple[float, float, int]]] = {}
    saves = []
    for name in track(["probe-s", "probe-m"], "timing methods on probe models", total=2):
        folder = synthetic_llama(_folder() / name, **PROBE_MODELS[name])
        shape = ModelShape.of(folder)
        runs = run_stages(folder, [[step] for step in PROBE_STEPS.values()], samples=samples, seq_len=seq)
        for (method, step), run in zip(PROBE_STEPS.items(), runs):
            config = _config(step)
            counted = predict.method_seconds(model, shape, shape, config, predict.Data(samples, seq), predict.Estimate())
            points.setdefault(method, []).append((run["parts"]["compress"], counted, len(shape.projections)))
            after = shape.after(config)
            saves.append(run["parts"]["save"] - model.write_s(after.disk_bytes) - 2 * after.disk_bytes / model.hash_bps)
    model.methods, model.per_projection_s = {}, {}
    for method, pts in points.items():
        (m1, c1, n1), (m2, c2, n2) = pts
        det = c1 * n2 - c2 * n1
        scale = (m1 * n2 - m2 * n1) / det if det else -1.0
        per = (c1 * m2 - c2 * m1) / det if det else -1.0
        if scale <= 0 or per < 0:   # no non-negative exact fit: one scale, least squares in log space
            scale, per = math.sqrt(m1 / max(c1, 1e-9) * m2 / max(c2, 1e-9)), 0.0
        model.methods[method], model.per_projection_s[method] = scale, per
    model.save_fixed_s = max(statistics.median(saves), 0.0)
    return model


def _config(step: dict[str, Any]) -> Any:
    from ..recipe import Recipe

    return Recipe.from_dict({"steps": [step]}).steps[0]


if __name__ == "__main__":  # the child
    print(json.dumps(run_child(json.loads(sys.argv[1]))), flush=True)
