"""Structured pruning and quantization on the real models in ../shared and from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from secateur import lineage
import secateur
from secateur import StructuredConfig, compress_
from secateur.data import calibration_set
from secateur.testing import run_cli


def test_minilm_depth_influence_keeps_the_first_and_last_layers(minilm_dir, data_dir):
    """ShortGPT's block influence on unlabelled STS-B train text keeps layers 0, 4, 5 of MiniLM
    (84.08 STS-B dev in benchmarks/structured_quality.py; layers 0-1-2 give 63)."""
    model, tok, _ = secateur.load(minilm_dir)
    calib = calibration_set("stsb", tok, 32, 128, split="train")
    compress_(model, StructuredConfig(mlp=0.0, drop_layers=3), data=calib)
    result = lineage.of(model).history()[-1]["result"]
    assert result["kept_blocks"] == [0, 4, 5]
    assert result["depth_importance"] == "influence"
    assert model.config.num_hidden_layers == 3 and result["standard_checkpoint"]


def test_stories_one_kv_group_and_mlp_round_trip(stories_dir, data_dir, tmp_path):
    model, tok, _ = secateur.load(stories_dir)
    calib = calibration_set("tinystories", tok, 16, 256)
    compress_(model, StructuredConfig(heads=0.25, mlp=0.25, importance="activation"), data=calib)
    result = lineage.of(model).history()[-1]["result"]
    assert result["after"]["heads"] == [6] * 5 and result["after"]["kv_heads"] == [3] * 5
    assert result["after"]["intermediate"] == [129] * 5
    ids = calib.input_ids[:2]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    path = secateur.save(model, tmp_path / "a", tokenizer=tok)
    reloaded = secateur.load(path).model
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_cli_structured_prints_shapes_and_writes_an_artifact(capsys, stories_dir, data_dir, tmp_path):
    out_dir = tmp_path / "pruned"
    code, out, err = run_cli(capsys, "prune", str(stories_dir), "--structured", "--heads", "0.25", "--mlp", "0.5",
                             "--drop-layers", "1", "--importance", "taylor", "--data", "tinystories",
                             "--samples", "8", "--out", str(out_dir))
    assert code == 0, err
    assert "structured pruning: shapes" in out and "172" in out and "86" in out
    card = json.loads((out_dir / "compression.json").read_text())
    step = card["history"][0]
    assert step["step"]["method"] == "structured" and step["result"]["importance"] == "taylor"
    assert step["result"]["after"]["layers"] == 4
    assert secateur.load(out_dir).model.config.num_hidden_layers == 4


def test_the_readmes_structured_example_loads_in_stock_transformers(capsys, stories_dir, data_dir, tmp_path):
    """The README promises the output of its structured example loads with stock from_pretrained
    (its --heads 0.25 once left 6 of 8 heads, which transformers 5 refuses for hidden 64)."""
    import re
    import shlex

    from transformers import AutoModelForCausalLM

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"secateur prune \.\./shared/models/stories260K/hf --structured (.*?)--out", readme, re.S)
    options = shlex.split(command.group(1).replace("\\\n", " "))
    out_dir = tmp_path / "example"
    code, _, err = run_cli(capsys, "prune", str(stories_dir), "--structured", *options, "--samples", "8",
                           "--out", str(out_dir))
    assert code == 0, err
    stock = AutoModelForCausalLM.from_pretrained(str(out_dir))
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (4, 2)


def test_cli_structured_bad_input_is_one_line(capsys, stories_dir):
    code, _, err = run_cli(capsys, "prune", str(stories_dir), "--structured", "--mlp", "0.5",
                           "--importance", "activaton")
    assert code != 0 and "did you mean 'activation'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "prune", str(stories_dir), "--structured", "--mlp", "0.5",
                           "--importance", "activation")
    last = err.strip().splitlines()[-1]
    assert code != 0 and last.startswith("error:") and "needs calibration data" in last and "Traceback" not in err
    code, _, err = run_cli(capsys, "prune", str(stories_dir), "--structured", "--drop-layers", "5",
                           "--data", "tinystories", "--samples", "4")
    assert code != 0 and "at least one must stay" in err


def test_cli_quantize_gptq_writes_a_packed_checkpoint(capsys, stories_dir, data_dir, tmp_path):
    out_dir = tmp_path / "q"
    code, out, err = run_cli(capsys, "quantize", str(stories_dir), "--method", "gptq", "--bits", "4",
                             "--data", "tinystories", "--samples", "8", "--out", str(out_dir))
    assert code == 0, err
    assert "method: gptq" in err and "bits: 4" in err  # the recipe it ran
    config = json.loads((out_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    card = json.loads((out_dir / "compression.json").read_text())
    assert card["quantization"]["layers"] and all(v["bits"] == 4 for v in card["quantization"]["layers"].values())
    from secateur.runtime.linear import QuantLinear

    model = secateur.load(out_dir).model
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 35


def test_cli_quantize_bad_input_is_one_line(capsys, stories_dir):
    code, _, err = run_cli(capsys, "quantize", str(stories_dir), "--method", "gptqq")
    assert code != 0 and "did you mean 'gptq'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "quantize", str(stories_dir), "--method", "gptq", "--bits", "4")
    assert code != 0 and "needs calibration data" in err.strip().splitlines()[-1]
    code, _, err = run_cli(capsys, "quantize", str(stories_dir), "--bits", "9")
    assert code != 0 and "bits" in err.strip().splitlines()[-1]


def test_cli_quantize_no_fallback_refuses_a_group_size_that_does_not_divide(capsys, stories_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", str(stories_dir), "--method", "rtn", "--bits", "4", "--group-size",
                           "128", "--no-fallback", "--out", str(tmp_path / "q"))
    assert code != 0 and "does not divide its 64 input columns" in err.strip().splitlines()[-1]
    code, _, err = run_cli(capsys, "quantize", str(stories_dir), "--method", "rtn", "--bits", "4", "--group-size",
                           "128", "--out", str(tmp_path / "q"))
    assert code == 0, err


def test_cli_distill_cuts_layers_trains_and_resumes(capsys, stories_dir, data_dir, tmp_path):
    """`secateur distill` keeps blocks 0,1,2,4 of stories260K, distills it from the full model on
    the P1 calibration text; the artifact is a plain 4-block checkpoint; the card holds the run."""
    out_dir = tmp_path / "student"
    code, out, err = run_cli(capsys, "distill", str(stories_dir), "--keep-layers", "0,1,2,4", "--data",
                             "tinystories:calibration", "--steps", "4", "--batch-size", "4", "--seq-len", "64",
                             "--set", "eval_every=2", "--set", "temperature=1.5", "--out", str(out_dir))
    assert code == 0, err
    assert "method: distill" in err and "blocks:" in err and "temperature: 1.5" in err
    loaded = secateur.load(out_dir)
    assert loaded.model.config.num_hidden_layers == 4
    step = loaded.info["card"]["recipe"]["steps"][-1]
    assert step["method"] == "distill" and step["temperature"] == 1.5
    assert not (tmp_path / ".student.resume").exists()  # the training checkpoints go once the artifact is written


def test_cli_distill_bad_input_is_one_line(capsys, stories_dir, data_dir):
    for args, expected in ((("--data", "tinystorie"), "did you mean 'tinystories'"),
                           (("--data", "tinystories", "--keep-layers", "0,9"), "blocks 0..4"),
                           (("--data", "tinystories", "--set", "temprature=2"), "did you mean 'temperature'"),
                           (("--data", "tinystories", "--set", "kl=0", "--set", "ce=0"), "every loss weight is 0")):
        code, _, err = run_cli(capsys, "distill", str(stories_dir), *args, "--steps", "1")
        assert code == 2 and expected in err and "Traceback" not in err, (args, err)


def test_cli_distill_a_fresh_smaller_student(capsys, stories_dir, data_dir, tmp_path):
    out_dir = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "distill", str(stories_dir), "--fresh", "num_hidden_layers=2", "--data",
                           "tinystories:calibration", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                           "--out", str(out_dir))
    assert code == 0, err
    assert "fresh student" in err and f"teacher: {stories_dir}" in err
    assert secateur.load(out_dir).model.config.num_hidden_layers == 2
