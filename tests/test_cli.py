"""The command line: one clear line and a non-zero exit for bad input, JSON on request, real figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from secateur.cli import main
from secateur.testing import run_cli as run
from secateur.errors import SecateurError
from secateur.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer("llama").save_pretrained(path)
    return path


def write_recipe(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return path


def test_methods_json(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0 and {"kind": "prune", "needs_data": False}.items() <= rows["magnitude"].items()
    assert rows["sparsegpt"]["needs_data"] and rows["wanda"]["needs_data"]
    assert rows["magnitude"]["needs"] == "nothing" and "calibration windows" in rows["gptq"]["needs"]
    for name in ("distill", "qat", "gradual"):  # they said "needs data: no"; they need training text
        assert "training text" in rows[name]["needs"]
    assert "activation, Taylor or depth" in rows["structured"]["needs"]


def test_explain(capsys):
    code, out, _ = run(capsys, "explain", "magnitude")
    assert code == 0 and "sparsity" in out and "method: magnitude" in out and "Han et al." in out


def test_misspelled_recipe_key_is_one_line(capsys, tmp_path, tiny_dir):
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\nsteps:\n  - method: magnitude\n    sparsty: 0.5\n")
    code, out, err = run(capsys, "compress", str(recipe))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "steps[0].sparsty" in lines[0] and "did you mean 'sparsity'?" in lines[0]


def test_unknown_method_and_missing_path(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "prune", str(tiny_dir), "--method", "magnitud", "--json")
    assert code == 2 and "unknown method 'magnitud' (did you mean 'magnitude'?)" in err
    code, _, err = run(capsys, "eval", str(tmp_path / "nope"), "--task", "speed")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "eval", str(tiny_dir), "--task", "perplexity", "--data", "tinystorie")
    assert code == 2 and "did you mean 'tinystories'" in err


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "secateur.cli", "--debug", "eval", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_dry_run_lists_modules(capsys, tmp_path, tiny_dir):
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\nsteps:\n  - method: magnitude\n    ignore: ['re:mlp']\n")
    code, out, _ = run(capsys, "compress", str(recipe), "--dry-run", "--json")
    plan = json.loads(out)["plan"]
    names = [m["name"] for m in plan[0]["modules"]]
    assert code == 0 and "model.layers.0.self_attn.q_proj" in names and not any("mlp" in n for n in names)
    assert not (tiny_dir / "compression.json").exists()


def test_compress_with_override_writes_artifact(capsys, tmp_path, tiny_dir):
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\nsteps:\n  - method: magnitude\n    sparsity: 0.5\n")
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "compress", str(recipe), "--set", "steps[0].sparsity=0.25", "--out", str(out_dir),
                       "--json")
    result = json.loads(out)
    assert code == 0 and result["steps"][0]["step"]["sparsity"] == 0.25
    card = json.loads((out_dir / "compression.json").read_text())
    assert card["recipe"]["steps"][0]["sparsity"] == 0.25
    code, out, _ = run(capsys, "info", str(out_dir), "--json")
    assert code == 0 and json.loads(out)["card"]["steps"] == ["magnitude"]


def test_eval_p1_prints_5_508(capsys, stories_dir, data_dir, tmp_path):
    code, out, _ = run(capsys, "eval", str(stories_dir), "--task", "perplexity", "--data", "tinystories",
                       "--output", str(tmp_path / "p1.json"))
    result = json.loads((tmp_path / "p1.json").read_text())
    assert code == 0 and result["protocol"] == "P1" and f"{result['value']:.3f}" == "5.508"
    assert "5.508" in out and result["settings"]["fingerprint"]


def test_eval_p2_prints_86_72(capsys, minilm_dir, data_dir):
    code, out, _ = run(capsys, "eval", str(minilm_dir), "--task", "sts", "--data", "stsb", "--json")
    result = json.loads(out)
    assert code == 0 and result["protocol"] == "P2" and f"{result['value']:.2f}" == "86.72"


def test_import_llama2c_cli(capsys, tmp_path, llama2c_dir, stories_dir):
    pytest.importorskip("sentencepiece")
    out_dir = tmp_path / "imported"
    code, _, _ = run(capsys, "import", "llama2c", str(llama2c_dir / "stories260K.bin"),
                     str(llama2c_dir / "tok512.model"), str(out_dir))
    assert code == 0 and (out_dir / "model.safetensors").exists()
    code, _, err = run(capsys, "import", "llama2c", str(llama2c_dir / "missing.bin"),
                       str(llama2c_dir / "tok512.model"), str(tmp_path / "x"))
    assert code == 2 and "missing.bin" in err


@pytest.mark.parametrize("name", ["stories260k-magnitude.yaml", "minilm-magnitude.yaml", "minilm-structured-depth.yaml",
                                  "minilm-distill-3of6.yaml", "stories260k-depth-distill.yaml"])
def test_example_recipes_validate(capsys, name, shared_dir, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("SECATEUR_SHARED_DIR", str(shared_dir))
    recipe = Path(__file__).resolve().parents[1] / "examples" / "recipes" / name
    code, out, _ = run(capsys, "compress", str(recipe), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["plan"][0]["modules"]


def test_version(capsys):
    from secateur import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out


def test_prune_sparsegpt_sparse_storage_and_export(capsys, tmp_path, stories_dir, data_dir):
    out_dir = tmp_path / "sg"
    code, out, _ = run(capsys, "prune", str(stories_dir), "--method", "sparsegpt", "--sparsity", "0.5",
                       "--data", "tinystories", "--samples", "8", "--storage", "sparse", "--out", str(out_dir), "--json")
    result = json.loads(out)
    assert code == 0 and result["steps"][0]["result"]["sparsity"] == 0.5
    layers = result["steps"][0]["result"]["layers"]
    assert all(0 < info["relative_error"] < 1 for info in layers.values())
    card = json.loads((out_dir / "compression.json").read_text())
    assert card["storage"]["ratio"] < 0.65 and card["data_fingerprints"]
    assert not (tmp_path / ".sg.resume").exists()          # checkpoints are dropped once the artifact exists
    code, _, _ = run(capsys, "export", str(out_dir), str(tmp_path / "dense"))
    import transformers

    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert float((stock.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5


def test_override_matching_nothing_names_the_step(capsys, tmp_path, tiny_dir):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join("the cat sat on the mat number %d" % i for i in range(60)))
    recipe = write_recipe(tmp_path, f"model: {tiny_dir}\ndata: {{source: {text}, samples: 4, seq_len: 16}}\n"
                                    "steps:\n  - method: wanda\n    overrides: {'re:nomatch': 0.3}\n")
    code, _, err = run(capsys, "compress", str(recipe))
    assert code == 2 and "steps[0].overrides.re:nomatch: pattern 're:nomatch' matches no module" in err


def test_info_machine_names_the_cpu_and_each_operations_kernel_beside_float32(capsys, monkeypatch):
    from secateur.runtime import dispatch, machine, survey

    monkeypatch.setattr(survey, "SHAPE", (128, 256))  # small, so that a first measurement is quick
    monkeypatch.setattr(survey, "ATTENTION", (4, 4, 16, 64))
    code, out, _ = run(capsys, "info", "--machine", "--json")
    data = json.loads(out)
    assert code == 0 and data["machine"]["cpu"] == machine.cpu_model() and data["cache"] == str(dispatch.cache_path())
    rows = {(r["op"], r["tokens"]): r for r in data["rows"]}
    assert {("w8a8", 1), ("w8a8", 128), ("w4a16", 1), ("w8a16", 128), ("w8a8_gemm", 128)} <= set(rows)
    for r in data["rows"]:
        assert r["kernel"] in dispatch.OPS[r["op"]] and r["kernel"] not in r["screened"]
        if r["op"] != "decode_attention":  # the chosen kernel is the fastest timed, float32 included
            assert r["us"] == min(r["candidates"].values()) and r["fp32_us"] == r["candidates"]["fp32"]
    code, out, _ = run(capsys, "info", "--machine")
    assert code == 0 and machine.cpu_model() in out and "w8a8_gemm" in out


def test_info_without_a_model_and_bad_kernel_settings_are_one_line(capsys, monkeypatch):
    code, _, err = run(capsys, "info")
    assert code == 2 and "info needs a MODEL" in err and "--machine" in err
    monkeypatch.setenv("SECATEUR_KERNELS", "w8a8=int_m")
    code, _, err = run(capsys, "info", "--machine")
    assert code == 2 and err.strip().count("\n") == 0 and "did you mean 'int_mm'" in err


@pytest.mark.parametrize("method,expected", [
    ("fp8", {"method": "fp8"}),  # no bits field: the CLI used to add one and fp8 refused it
    ("smoothquant", {"method": "smoothquant", "bits": 8, "activations": "int8"}),  # its own W8A8 defaults
    ("rtn", {"method": "rtn", "bits": 4, "strategy": "channel"}),
])
def test_quantize_takes_each_methods_own_defaults(capsys, tiny_dir, tmp_path, method, expected):
    text = tmp_path / "calib.txt"
    text.write_text("one small story about a cat.\n" * 200)
    extra = ["--data", str(text), "--samples", "4", "--seq-len", "16"] if method == "smoothquant" else []
    code, out, err = run(capsys, "quantize", str(tiny_dir), "--method", method, "--dry-run", "--json", *extra)
    assert code == 0, err
    step = json.loads(out)["recipe"]["steps"][0]
    assert expected.items() <= step.items()


def test_quantize_activations_option_gives_w8a8_and_wrong_options_are_one_line(capsys, tiny_dir):
    code, out, err = run(capsys, "quantize", str(tiny_dir), "--method", "rtn", "--bits", "8", "--activations", "int8",
                         "--dry-run", "--json")
    assert code == 0, err
    assert {"bits": 8, "activations": "int8"}.items() <= json.loads(out)["recipe"]["steps"][0].items()
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--method", "fp8", "--group-size", "8", "--dry-run")
    assert code == 2 and "takes no --group-size" in err and "strategy" in err and err.strip().count("\n") == 0
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--method", "rtn", "--bits", "8", "--activations", "int8")
    assert code == 0 and "scheme: W8A8 per channel" in err
    code, _, err = run(capsys, "quantize", str(tiny_dir), "--method", "rtn", "--group-size", "16")
    assert code == 0 and "scheme: W4A16 g16" in err


@pytest.mark.parametrize("how", ["raised", "returned"])
def test_ctrl_c_exits_130_with_one_line_never_0(capsys, monkeypatch, how):
    """Ctrl-C inside a command: typer either lets KeyboardInterrupt through or returns 130 from the
    app; both must leave with 130 and say so, so that `secateur … && next-step` stops."""
    import secateur.cli as cli

    if how == "raised":
        def interrupted(remeasure, as_json):
            raise KeyboardInterrupt
        monkeypatch.setattr(cli, "_machine_info", interrupted)
    else:
        monkeypatch.setattr(cli, "app", lambda **kwargs: 130)
    code, out, err = run(capsys, "info", "--machine")
    assert code == 130 and "interrupted: info" in err and err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as info:  # a command writing to --out says how to resume
        cli._interrupted(["prune", "MODEL", "--out", "runs/x"])
    assert info.value.code == 130 and "re-running the same command resumes" in capsys.readouterr().err


def test_ctrl_c_on_a_real_process_exits_130(tmp_path, tiny_dir):
    import os
    import signal
    import time

    script = ("import time, secateur.cli as c\n"
              "def slow(*a, **k):\n    print('started', flush=True); time.sleep(60)\n"
              "c._machine_info = slow\nc.main(['info', '--machine'])\n")
    # a process started from a shell gets SIGINT at its default; an ignored SIGINT would be inherited
    # from this pytest process if an earlier test (or a library it loaded) left it ignored
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("args,expected", [
    (["bogus"], "No such command 'bogus'. (commands: bench-serve, compress, demo"),
    (["prun"], "Did you mean 'prune', 'run'?"),
    (["prune"], "Missing argument 'model'"),
    (["prune", "x", "--sparsty", "0.5"], "No such option: --sparsty (Possible options: --sparsity)"),
])
def test_usage_errors_are_exit_2_with_the_valid_choices_not_a_bug(capsys, args, expected):
    code, _, err = run(capsys, *args)
    assert code == 2 and expected in err and "--debug" not in err and err.strip().count("\n") == 0


def test_debug_works_after_the_subcommand_too(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(SecateurError):  # --debug: the error itself, with its traceback
        main(["info", missing, "--debug"])
    code, _, err = run(capsys, "info", missing)
    assert code == 2 and err.startswith("error:")


def test_a_mistyped_storage_fails_a_dry_run_too(capsys, tiny_dir):
    code, _, err = run(capsys, "prune", str(tiny_dir), "--sparsity", "0.5", "--storage", "sprase", "--dry-run")
    assert code == 2 and "unknown storage 'sprase' (did you mean 'sparse'?)" in err


def test_info_on_a_quantized_artifact_counts_packed_weights_and_names_the_storage(capsys, tmp_path):
    import secateur
    from secateur.quant.rtn import RTNConfig

    model = tiny_model("llama")
    dense_parameters = sum(p.numel() for p in model.parameters())
    secateur.compress_(model, RTNConfig(bits=4, strategy="group", group_size=16))
    path = secateur.save(model, tmp_path / "q4", tokenizer=tiny_tokenizer("llama"))
    code, out, _ = run(capsys, "info", str(path), "--json")
    data = json.loads(out)
    assert code == 0 and data["arch"]["parameters"] == dense_parameters == data["card"]["parameters"]
    assert data["card"]["storage"].startswith("compressed-tensors pack-quantized, 4-bit, group 16")


def test_an_error_is_shown_alone_and_a_missing_data_file_fails_before_the_model_loads(capsys, tiny_dir, tmp_path,
                                                                                       monkeypatch):
    import secateur.artifacts

    loads = []
    real = secateur.artifacts.load
    monkeypatch.setattr(secateur.artifacts, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    code, _, err = run(capsys, "prune", str(tiny_dir), "--method", "wanda", "--data", str(tmp_path / "missing.txt"))
    assert code == 2 and "does not exist" in err and "method: wanda" not in err and len(err.strip().splitlines()) == 1
    assert not loads  # the data source was checked first
    code, _, err = run(capsys, "prune", str(tiny_dir), "--sparsity", "0.3")
    assert code == 0 and "method: magnitude" in err  # on success the recipe it ran is printed


def test_known_library_deprecation_noise_is_filtered_unless_debug(capsys):
    import logging
    import warnings

    from secateur.cli import _quiet_known_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_known_noise()
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers.utils.generic")
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("`past_key_values`/`cache_params` are deprecated. Use `cache` instead.")
        logger.warning("a real warning")
    finally:
        logger.removeHandler(handler)
    assert records == ["a real warning"]


def test_the_before_after_table_labels_its_rows(capsys, tiny_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a small story about a cat and a dog.\n" * 50)
    code, out, err = run(capsys, "prune", str(tiny_dir), "--sparsity", "0.5", "--eval", f"perplexity:{text}")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "perplexity" in line]
    assert len(rows) == 2 and "before" in rows[0] and "after" in rows[1]
