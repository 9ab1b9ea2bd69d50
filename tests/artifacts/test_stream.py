"""Streamed (out-of-core) calibration: blocks loaded from safetensors one at a time and written as
soon as they are done give exactly the in-memory result (issue 26 item 1, first part)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from secateur.artifacts.stream import BlockStream, skeleton
from secateur.calibrate import Hessian, Options, sequential
from secateur.models.arch import arch_of
from secateur.models.layers import weight_matrix
from secateur.prune.masks import row_mask
from secateur.targets import select_modules
from secateur.testing import tiny_model


class Prune:
    def observer(self, name, module):
        return Hessian(weight_matrix(module).shape[1])

    def compress(self, name, module, stat, block):
        w = weight_matrix(module)
        score = w.abs() * stat.matrix().diagonal().sqrt() if hasattr(stat, "matrix") else w.abs()
        w.mul_(row_mask(score, 0.5))
        return {}


def _run(model, ids, hooks=None):
    targets = select_modules(model, ["Linear"], ["lm_head"])
    sequential(model, ids, targets, Prune(), Options(batch_size=2, block_hooks=hooks))


def test_streamed_equals_in_memory_bitwise(tmp_path):
    model = tiny_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True, max_shard_size="20KB")
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    _run(model, ids)
    reference = model.state_dict()

    stream = BlockStream(src, tmp_path / "out")
    prefix = arch_of(model).arch.block_prefix(model)
    streamed = skeleton(src, stream, prefix)
    assert all(p.device.type == "meta" for p in streamed.get_submodule(prefix).parameters())
    _run(streamed, ids, stream)
    assert all(p.device.type == "meta" for p in streamed.get_submodule(prefix).parameters())
    stream.finish(streamed, prefix)
    assert stream.done_blocks() == len(streamed.get_submodule(prefix))
    got = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(f))
    for k, v in reference.items():
        if k == "lm_head.weight" and k not in got:   # tied
            continue
        assert torch.equal(got[k], v), k


def _streamed(src, out, prefix):
    stream = BlockStream(src, out)
    return stream, skeleton(src, stream, prefix)


def _tensors(path):
    got = {}
    for f in path.glob("*.safetensors"):
        got.update(load_file(f))
    return got


def _both(tmp_path, method, config, seed):
    """``method`` on a tiny Llama in memory and streamed from its saved copy: (the in-memory model,
    its result, the streamed result, the streamed output's tensors, the ids)."""
    from secateur.api import Context, get_method

    model = tiny_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True)
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(seed))
    expected = get_method(method).apply(model, config, Context(data=ids))
    stream, streamed = _streamed(src, tmp_path / "out", "model.layers")
    result = get_method(method).apply(streamed, config, Context(data=ids, block_hooks=stream))
    stream.finish(streamed, "model.layers")
    return model, expected, result, _tensors(tmp_path / "out"), ids


def _assert_equal(reference, got):
    """Every tensor of ``reference`` is in ``got``, bit for bit (a tied head is written once)."""
    for k, v in reference.items():
        if k == "lm_head.weight" and k not in got:
            continue
        assert torch.equal(got[k], v), k


def test_gptq_w4_streamed_equals_in_memory(tmp_path):
    """A quantized block is written in the artifact's compressed-tensors layout at once: the
    tensors equal what ``save`` writes for the model quantized in memory."""
    from secateur.artifacts.compressed_tensors import state_dict
    from secateur.quant.gptq import GPTQConfig

    model, _, _, got, _ = _both(tmp_path, "gptq", GPTQConfig(bits=4, group_size=16, batch_size=2), 1)
    reference, _ = state_dict(model)
    assert any(k.endswith("weight_packed") for k in got) and any(k.endswith("weight_scale") for k in got)
    _assert_equal(reference, got)
    assert set(got) >= set(reference) - {"lm_head.weight"}


def test_sparsegpt_streamed_equals_in_memory(tmp_path):
    from secateur.prune.sparsegpt import SparseGPTConfig

    model, expected, got_result, got, ids = _both(tmp_path, "sparsegpt", SparseGPTConfig(sparsity=0.5, batch_size=2), 2)
    assert got_result["sparsity"] == expected["sparsity"]
    _assert_equal(model.state_dict(), got)
    from transformers import AutoModelForCausalLM   # a pruned output is a plain checkpoint: stock transformers loads it

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


_CHILD = r'''
import sys, torch
from secateur.api import Context, get_method
from secateur.artifacts.stream import BlockStream, skeleton
from secateur.quant.gptq import GPTQConfig
src, out, mode = sys.argv[1:4]
stream = BlockStream(src, out)
model = skeleton(src, stream, "model.layers")
if mode == "run":
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    get_method("gptq").apply(model, GPTQConfig(bits=4, group_size=128, batch_size=2), Context(data=ids, block_hooks=stream))
    stream.finish(model, "model.layers")
from secateur.progress import peak_rss_bytes
print(peak_rss_bytes())  # this process's own peak (ru_maxrss would carry pytest's over execve)
'''


def test_streamed_peak_rss_does_not_grow_with_the_model(tmp_path):
    """The property that makes a model larger than memory fit: a streamed GPTQ W4 run on 16 blocks
    of 10 MiB (fp32) peaks within one block + 32 MiB of the same run on 2 blocks, each measured as
    the child process's own high-water mark (VmHWM). In memory the 14 extra blocks alone would add
    140 MiB; a loop that kept each finished block, or its dense copy, would add at least that."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    block = (4 * 512 * 512 + 3 * 512 * 1024) * 4
    peaks = {}
    for layers in (2, 16):
        config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=512, tie_word_embeddings=False)
        torch.manual_seed(0)
        src = tmp_path / f"src{layers}"
        LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True, max_shard_size="40MB")
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(tmp_path / f"out{layers}"), "run"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[layers] = int(proc.stdout.split()[-1])
    assert peaks[16] <= peaks[2] + block + 32 * 2**20, (peaks, block)


def test_stories260k_gptq_streamed_equals_in_memory(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM

    from secateur.api import Context, get_method
    from secateur.quant.gptq import GPTQConfig

    from secateur.artifacts.compressed_tensors import state_dict

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(3))
    config = GPTQConfig(bits=4, group_size=32, batch_size=2)
    get_method("gptq").apply(model, config, Context(data=ids))
    reference, _ = state_dict(model)
    stream, streamed = _streamed(stories_dir, tmp_path / "out", "model.layers")
    get_method("gptq").apply(streamed, config, Context(data=ids, block_hooks=stream))
    stream.finish(streamed, "model.layers")
    _assert_equal(reference, _tensors(tmp_path / "out"))


def test_wanda_streams_and_other_methods_are_refused_in_one_line(tmp_path):
    import pytest

    from secateur.artifacts.stream import check_streamable
    from secateur.errors import SecateurError
    from secateur.prune.wanda import WandaConfig

    config = WandaConfig(sparsity=0.5, batch_size=2)
    check_streamable([config])
    model, _, _, got, _ = _both(tmp_path, "wanda", config, 4)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k in got)
    from types import SimpleNamespace

    with pytest.raises(SecateurError) as err:
        check_streamable([config, SimpleNamespace(method="distill")])
    assert "\n" not in str(err.value) and "steps[1]: method 'distill' cannot run streamed" in str(err.value)


# --- the product: secateur compress --stream --------------------------------------------------------
def _recipe(tmp_path, model, step, samples=8):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "data": {"source": "tinystories", "samples": samples,
                                                                  "seq_len": 32}, "steps": [step]}))
    return path


def test_compress_stream_writes_the_artifact_compress_writes(tmp_path, stories_dir, data_dir, capsys):
    """``secateur compress RECIPE --out DIR --stream`` on stories260K: an ordinary artifact (verified
    card, compressed-tensors config) whose weights equal the in-memory run's bit for bit, that
    stock transformers and secateur.load both read; the card's quantization entry and sparsity
    equal the in-memory card's; the embedding held only the calibration rows."""
    import json

    from transformers import AutoModelForCausalLM

    import secateur
    from secateur.artifacts import verify
    from secateur.testing import run_cli

    recipe = _recipe(tmp_path, stories_dir, {"method": "gptq", "bits": 4, "group_size": 32})
    code, out, err = run_cli(capsys, "compress", str(recipe), "--out", str(tmp_path / "streamed"), "--stream")
    assert code == 0, err
    code, _, err = run_cli(capsys, "compress", str(recipe), "--out", str(tmp_path / "memory"))
    assert code == 0, err
    card = verify(tmp_path / "streamed")
    reference = json.loads((tmp_path / "memory" / "compression.json").read_text())
    assert card["streamed"]["blocks"] == 5 and card["quantization"]["layers"] == reference["quantization"]["layers"]
    assert card["sparsity"] == reference["sparsity"] and card["base_model"] == reference["base_model"]
    assert card["history"][0]["step"] == reference["history"][0]["step"]
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "memory" / "config.json").read_text())["quantization_config"]
    assert not list(tmp_path.glob(".streamed.resume*")), "the resume folder is removed once the artifact is in place"
    a, b = secateur.load(tmp_path / "streamed"), secateur.load(tmp_path / "memory")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, b.model(ids).logits)


_KILLED = r'''
import sys, time
from secateur.artifacts import stream as st
recipe, out, marker, log = sys.argv[1:5]
load, done = st.BlockStream.load, st.BlockStream.done
def logged_load(self, index, prefix, block):
    open(log, "a").write(f"{index}\n")
    load(self, index, prefix, block)
def slow_done(self, index, prefix, block):
    done(self, index, prefix, block)
    if index == 2 and marker != "-":
        open(marker, "w").close()
        time.sleep(120)
st.BlockStream.load, st.BlockStream.done = logged_load, slow_done
from secateur.cli import main
main(["compress", recipe, "--out", out, "--stream"])
'''


def test_a_killed_streamed_run_resumes_at_the_first_block_not_written(tmp_path, stories_dir, data_dir):
    """SIGKILL after block 2 is written: the re-run reads blocks 2.. only (the calibration loop's
    checkpoint holds the next inputs, the written shards are the weights) and its artifact equals
    an uninterrupted run's, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "child.py"
    script.write_text(_KILLED)
    recipe = _recipe(tmp_path, stories_dir, {"method": "sparsegpt", "sparsity": 0.5})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, str(script), str(recipe)]
    subprocess.run(run + [str(tmp_path / "straight"), "-", str(tmp_path / "straight.log")], check=True, env=env,
                   capture_output=True)
    marker, log = tmp_path / "marker", tmp_path / "resumed.log"
    child = subprocess.Popen(run + [str(tmp_path / "resumed"), str(marker), str(log)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the child never wrote block 2"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.resume" / "stream").is_dir()
    log.write_text("")
    subprocess.run(run + [str(tmp_path / "resumed"), "-", str(log)], check=True, env=env, capture_output=True)
    assert log.read_text().split() == ["2", "3", "4"]
    a, b = _tensors(tmp_path / "straight"), _tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_embedding_holds_the_calibration_rows_only(tmp_path, stories_dir):
    """The skeleton's embedding has one row per distinct calibration token, the head stays on the
    meta device, and the renumbered tokens look up the same vectors."""
    from safetensors.torch import load_file

    from secateur.artifacts.stream import compact_ids

    ids = torch.tensor([[7, 3, 7, 300], [3, 3, 12, 499]])
    rows, renumbered = compact_ids(ids)
    assert rows.tolist() == [3, 7, 12, 300, 499] and torch.equal(rows[renumbered], ids)
    stream = BlockStream(stories_dir, tmp_path / "out")
    model = skeleton(stories_dir, stream, rows=rows)
    table = load_file(stories_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings()(renumbered), table[ids])
    assert model.get_output_embeddings().weight.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())


def test_streamed_runs_refuse_bad_input_in_one_line(tmp_path, stories_dir, data_dir, capsys):
    from secateur.testing import run_cli

    cases = [
        ({"method": "awq", "bits": 4}, [], "method 'awq' cannot run streamed"),
        ({"method": "gptq", "bits": 4}, ["--nproc", "2"], "--stream runs in one process"),
    ]
    for step, extra, expected in cases:
        code, _, err = run_cli(capsys, "compress", str(_recipe(tmp_path, stories_dir, step)), "--out",
                               str(tmp_path / "o"), "--stream", *extra)
        assert code != 0 and expected in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "compress", str(_recipe(tmp_path, stories_dir, {"method": "gptq", "bits": 4})),
                           "--stream")
    assert code != 0 and "give --out DIR" in err
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(capsys, "compress", str(_recipe(tmp_path, tmp_path / "plain", {"method": "gptq", "bits": 4})),
                           "--out", str(tmp_path / "o"), "--stream")
    assert code != 0 and "no config.json and .safetensors weights" in err, err


def test_planner_predicts_a_streamed_peak_far_under_the_in_memory_one(stories_dir):
    """``plan_recipe(..., streamed=True)``: the model's weights are not in the peak, one block is."""
    from secateur.planner import Data, ModelShape, plan_recipe
    from secateur.recipe import Recipe

    step = Recipe.from_dict({"steps": [{"method": "gptq", "bits": 4}]}).steps[0]
    memory = plan_recipe(str(stories_dir), [step], Data(8, 32))
    streamed = plan_recipe(str(stories_dir), [step], Data(8, 32), streamed=True)
    shape = ModelShape.of(stories_dir)
    assert "weights" in memory.memory and "weights" not in streamed.memory
    assert streamed.memory["block weights"] == shape.max_block_bytes
    assert streamed.memory["embedding rows"] == 4 * shape.hidden * min(8 * 32, shape.vocab)
    assert streamed.peak_bytes < memory.peak_bytes


def test_data_free_methods_stream_block_by_block(tmp_path, stories_dir, capsys):
    """RTN and magnitude pruning streamed (no calibration data): the same weights and the same
    step result as the in-memory run; scope 'global' is refused in one line."""
    import json

    import yaml

    import secateur
    from secateur.testing import run_cli

    for i, step in enumerate([{"method": "rtn", "bits": 4, "group_size": 32},
                              {"method": "magnitude", "sparsity": 0.5, "scope": "matrix"}]):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_text(yaml.safe_dump({"model": str(stories_dir), "steps": [step]}))
        for name, extra in (("s", ["--stream"]), ("m", [])):
            code, _, err = run_cli(capsys, "compress", str(recipe), "--out", str(tmp_path / f"{name}{i}"), *extra)
            assert code == 0, err
        a, b = secateur.load(tmp_path / f"s{i}").model.state_dict(), secateur.load(tmp_path / f"m{i}").model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        card_s, card_m = (json.loads((tmp_path / f"{n}{i}" / "compression.json").read_text()) for n in "sm")
        assert card_s["history"][0]["result"] == card_m["history"][0]["result"]
        assert card_s["sparsity"] == card_m["sparsity"]
    recipe.write_text(yaml.safe_dump({"model": str(stories_dir), "steps": [{"method": "magnitude", "scope": "global"}]}))
    code, _, err = run_cli(capsys, "compress", str(recipe), "--out", str(tmp_path / "g"), "--stream")
    assert code != 0 and "scope 'global'" in err and len(err.strip().splitlines()) == 1
