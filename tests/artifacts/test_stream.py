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
    from secateur.quant.gptq import GPTQConfig

    model, _, _, got, _ = _both(tmp_path, "gptq", GPTQConfig(bits=4, group_size=16, batch_size=2), 1)
    reference = model.state_dict()
    assert any("qweight" in k or "weight_packed" in k or "qzeros" in k or "scale" in k for k in got)
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
import resource, sys, torch
from secateur.api import Context, get_method
from secateur.artifacts.stream import BlockStream, skeleton
from secateur.quant.gptq import GPTQConfig
src, out, mode = sys.argv[1:4]
stream = BlockStream(src, out)
model = skeleton(src, stream, "model.layers")
if mode == "run":
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    get_method("gptq").apply(model, GPTQConfig(bits=4, group_size=128, batch_size=2, record_error=False)
                             if "record_error" in GPTQConfig.__dataclass_fields__ else
                             GPTQConfig(bits=4, group_size=128, batch_size=2), Context(data=ids, block_hooks=stream))
    stream.finish(model, "model.layers")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
'''


def test_streamed_peak_rss_is_two_blocks_not_the_model(tmp_path):
    """16 blocks of 10 MiB (fp32): a streamed GPTQ W4 run's peak RSS stays under an idle process
    (torch + secateur + the meta skeleton with its small embedding) + 2 blocks + activations +
    Hessians + 64 MiB margin, far under the 160 MiB of block weights."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src", safe_serialization=True, max_shard_size="40MB")
    block = (4 * 512 * 512 + 3 * 512 * 1024) * 4
    peaks = {}
    for mode in ("idle", "run"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "src"), str(tmp_path / mode), mode],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[mode] = int(proc.stdout.split()[-1])
    hessians = (512 * 512 + 1024 * 1024) * 4 * 2        # fp32 H for the widest inputs + the factor work
    bar = peaks["idle"] + 2 * block + hessians + 64 * 2**20
    assert peaks["run"] <= bar, (peaks, bar)
    assert peaks["run"] - peaks["idle"] < 16 * block / 2   # far under the model


def test_stories260k_gptq_streamed_equals_in_memory(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM

    from secateur.api import Context, get_method
    from secateur.quant.gptq import GPTQConfig

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(3))
    config = GPTQConfig(bits=4, group_size=32, batch_size=2)
    get_method("gptq").apply(model, config, Context(data=ids))
    reference = model.state_dict()
    stream, streamed = _streamed(stories_dir, tmp_path / "out", "model.layers")
    get_method("gptq").apply(streamed, config, Context(data=ids, block_hooks=stream))
    stream.finish(streamed, "model.layers")
    got = _tensors(tmp_path / "out")
    for k, v in reference.items():
        if k == "lm_head.weight" and k not in got:
            continue
        assert torch.equal(got[k], v), k


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
