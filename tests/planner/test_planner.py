"""The resource planner: shapes read from a config match the real model, predictions move the way
the work does, a run that would not fit is refused naming the setting that fits, and the peak RSS
a fresh process reports is its own."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from secateur.planner import Data, StageSpec, plan_stages
from secateur.planner.costs import CostModel, cost_model, measure_primitives
from secateur.planner.predict import stage
from secateur.planner.shapes import ModelShape
from secateur.recipe import Recipe
from secateur.testing import run_cli


def _steps(*steps):
    return list(Recipe.from_dict({"steps": list(steps)}).steps)


def test_shape_from_the_config_matches_the_loaded_model(stories_dir, minilm_dir):
    """Reference: the real model's parameters and Linear modules, counted one by one."""
    from secateur.artifacts import load
    from secateur.models.layers import weight_matrix

    for folder in (stories_dir, minilm_dir):
        shape = ModelShape.of(folder)
        model = load(folder).model
        assert shape.params == sum(p.numel() for p in model.parameters())
        real = {p.name: tuple(weight_matrix(model.get_submodule(p.name)).shape) for p in shape.projections}
        assert real == {p.name: (p.d_out, p.d_in) for p in shape.projections}
        assert shape.disk_bytes == sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    stories = ModelShape.of(stories_dir)
    q = [p for p in stories.projections if p.block == 0]
    assert len({p.leader for p in q}) == 4  # q/k/v read one input, gate/up another, o and down their own


def test_structured_shape_after_matches_the_pruned_model(stories_dir, tmp_path):
    from secateur.api import compress_
    from secateur.artifacts import load, save

    step = _steps({"method": "structured", "drop_layers": 1, "mlp": 0.5, "importance": "magnitude",
                   "depth_importance": "magnitude"})[0]
    predicted = ModelShape.of(stories_dir).after(step)
    loaded = load(stories_dir)
    compress_(loaded.model, [step], tokenizer=loaded.tokenizer)
    save(loaded.model, tmp_path / "pruned", tokenizer=loaded.tokenizer)
    real = ModelShape.of(tmp_path / "pruned")
    assert (predicted.blocks, predicted.intermediate, predicted.params) == (real.blocks, real.intermediate, real.params)
    assert [(p.d_in, p.d_out) for p in predicted.projections] == [(p.d_in, p.d_out) for p in real.projections]


def test_predictions_follow_the_work(stories_dir):
    costs = cost_model()
    shape = ModelShape.of(stories_dir)
    gptq = _steps({"method": "gptq", "bits": 4})
    small, _ = stage(costs, shape, gptq, Data(32, 128))
    large, _ = stage(costs, shape, gptq, Data(128, 256))
    assert large.seconds > 2 * small.seconds and large.peak_bytes > small.peak_bytes
    offload, _ = stage(costs, shape, [dataclasses.replace(gptq[0], offload=True)], Data(128, 256))
    bf16, _ = stage(costs, shape, [dataclasses.replace(gptq[0], compute_dtype="bfloat16")], Data(128, 256))
    assert offload.memory["activations"] < large.memory["activations"] / 10
    assert bf16.memory["activations"] == pytest.approx(large.memory["activations"] / 2)
    distill, after = stage(costs, shape, _steps({"method": "structured", "drop_layers": 1, "mlp": 0.0},
                                                {"method": "distill", "steps": 50, "eval_every": 0}), Data(128, 256))
    assert after.blocks == shape.blocks - 1 and "autograd activations" in distill.memory
    assert set(distill.time) >= {"load", "structured", "distill", "save"}


def test_a_run_that_does_not_fit_is_refused_with_the_setting_that_fits(stories_dir):
    costs = cost_model()
    specs = {"gptq": StageSpec("base", _steps({"method": "gptq", "bits": 4}), Data(512, 256))}
    roomy = plan_stages(str(stories_dir), specs, costs, available=(64e9, "test"))
    assert roomy.fits and roomy.suggestions == []
    need = roomy.peak_bytes
    acts = roomy.stages[0].memory["activations"]
    tight = plan_stages(str(stories_dir), specs, costs, available=(need - acts / 3, "test"))
    assert not tight.fits
    line = tight.refusal()
    assert "\n" not in line and "variant 'gptq'" in line and "offload: true" in line
    # nothing fits when even the process alone is over the limit
    hopeless = plan_stages(str(stories_dir), specs, costs, available=(1e8, "test"))
    assert hopeless.suggestions == [] and "more memory" in hopeless.refusal()


def test_cost_model_measures_prices_on_this_machine():
    model = measure_primitives(CostModel())
    assert model.op_s > 0 and model.elementwise_bps > 1e8 and model.write_bps > 0 and model.hash_bps > 0
    # the interpolation returns the measured grid at its own points and stays between them elsewhere
    for rows, width, gflops in model.gemm:
        assert model.gflops(rows, width) == pytest.approx(gflops)
    values = [g for _, _, g in model.gemm]
    assert min(values) <= model.gflops(300, 700) <= max(values)


def test_peak_rss_of_a_fresh_process_is_its_own():
    """Linux keeps ru_maxrss across execve: a small child of a large parent read the parent's peak."""
    ballast = torch.ones(300 << 18)  # 300 MiB resident in this process
    code = "from secateur.progress import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 250 << 20
    del ballast


def test_a_probe_runs_a_real_stage_in_a_fresh_process(tmp_path):
    from secateur.planner.probe import run_stage, synthetic_llama

    folder = synthetic_llama(tmp_path / "tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    result = run_stage(folder, [{"method": "gptq", "bits": 4, "strategy": "channel"}], samples=8, seq_len=32)
    assert set(result["parts"]) == {"load", "calibration data", "compress", "save"}
    assert result["parts"]["compress"] > 0 and 50 << 20 < result["peak_rss"] < 4 << 30


PIPELINE = """
name: planned
family: planned
base: {base}
data: {{source: tinystories, samples: {samples}, seq_len: 256}}
variants:
  w4:
    steps: [{{method: gptq, bits: 4}}]
"""


def test_cli_plan_and_a_refused_run(stories_dir, data_dir, tmp_path, capsys, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(PIPELINE.format(base=stories_dir, samples=256)))
    code, out, err = run_cli(capsys, "plan", str(path), "-w", str(tmp_path / "runs"), "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["fits"] and plan["stages"][0]["runs"] and plan["stages"][0]["seconds"] > 0
    monkeypatch.setenv("SECATEUR_MEMORY_LIMIT", str(int(plan["peak_bytes"] - 1e6)))
    code, out, err = run_cli(capsys, "run", str(path), "-w", str(tmp_path / "runs"), "--no-register")
    assert code != 0 and "Traceback" not in err
    assert "needs about" in err and "would fit:" in err and "SECATEUR_MEMORY_LIMIT" in err
    assert not (tmp_path / "runs" / "planned" / "stages").exists()  # refused before anything ran
    code, out, err = run_cli(capsys, "plan", str(path), "-w", str(tmp_path / "runs"))
    assert code == 1 and "would fit:" in err
    monkeypatch.setenv("SECATEUR_MEMORY_LIMIT", "lots")
    code, out, err = run_cli(capsys, "plan", str(path), "-w", str(tmp_path / "runs"))
    assert code != 0 and "SECATEUR_MEMORY_LIMIT" in err and "Traceback" not in err
