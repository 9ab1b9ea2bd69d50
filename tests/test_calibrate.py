"""The block-sequential calibration loop: capture, shared statistics, propagation, errors, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from secateur.calibrate import ColumnNorms, Hessian, Options, input_groups, sequential
from secateur.models.arch import arch_of
from secateur.models.layers import weight_matrix
from secateur.prune.masks import row_mask
from secateur.targets import select_modules
from secateur.testing import FAMILIES, tiny_model


class Recorder:
    """A test method: column norms per input group; 'compress' = magnitude pruning of each row."""

    def __init__(self, sparsity=0.5):
        self.sparsity = sparsity
        self.observed: dict[str, Hessian] = {}
        self.compressed: list[str] = []

    def observer(self, name, module):
        self.observed[name] = Hessian(weight_matrix(module).shape[1])
        return self.observed[name]

    def compress(self, name, module, stat, block):
        self.compressed.append(name)
        w = weight_matrix(module)
        w.mul_(row_mask(w.abs(), self.sparsity))
        return {"tokens": stat.tokens}


def calib(n=6, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (n, seq), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_every_family_and_shares_statistics(family):
    model = tiny_model(family)
    targets = select_modules(model, ["Linear"], ["lm_head"])
    method = Recorder()
    result = sequential(model, calib(), targets, method, Options(batch_size=4))
    block_targets = [n for n in targets if ".0." in n or ".1." in n]
    assert sorted(method.compressed) == sorted(n for n in targets if n in block_targets)
    facts = arch_of(model)
    if facts.model_type in ("llama", "mistral", "qwen2"):   # q/k/v share one; gate/up share one
        assert len(method.observed) == 2 * 4                 # per block: qkv, o, gateup, down
    for name, info in result.layers.items():
        assert info["tokens"] == 6 * 16 and 0.0 < info["relative_error"] < 1.0 and info["sparsity"] == 0.5


def test_capture_matches_full_forward():
    """Replaying the captured block inputs through every block gives the model's own hidden states."""
    model = tiny_model("llama")
    ids = calib(2, 12)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    arch = arch_of(model).arch
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].clone()))
             for i, b in enumerate(arch.get_blocks(model))]
    sequential(model, ids, {}, Recorder(), Options(batch_size=2, record_error=False))
    for h in hooks:
        h.remove()
    # nothing targeted: every pass of a block sees exactly what the full forward gave it
    for i in (0, 1):
        assert seen[i] and all(torch.allclose(x, expected[i], atol=1e-6) for x in seen[i])


def test_propagate_dense_vs_compressed_and_offload():
    ids = calib()
    runs = {}
    for propagate, offload in (("compressed", False), ("compressed", True), ("dense", False)):
        model = tiny_model("llama")
        targets = select_modules(model, ["Linear"], ["lm_head"])
        sequential(model, ids, targets, Recorder(), Options(propagate=propagate, offload=offload))
        runs[(propagate, offload)] = {k: v.clone() for k, v in model.state_dict().items()}
    a, b, c = runs.values()
    assert all(torch.equal(a[k], b[k]) for k in a)                       # offload changes nothing
    assert all(torch.equal(a[k], c[k]) for k in a)                       # magnitude ignores inputs
    h_dense, h_comp = [], []
    for propagate, store in (("dense", h_dense), ("compressed", h_comp)):
        model = tiny_model("llama")
        method = Recorder()
        sequential(model, ids, select_modules(model, ["Linear"], ["lm_head"]), method, Options(propagate=propagate))
        store.append(method.observed["model.layers.1.self_attn.q_proj"].xtx)
    assert not torch.equal(h_dense[0], h_comp[0])                        # block 1 saw different inputs


def test_input_groups_from_table():
    model = tiny_model("llama")
    arch = arch_of(model).arch
    names = [f"model.layers.0.{p}" for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    groups = input_groups(arch, "model.layers.0", names)
    assert groups == {"model.layers.0.self_attn.k_proj": names[:2], "model.layers.0.mlp.down_proj": [names[2]]}


CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from safetensors.torch import save_file
    from secateur.calibrate import Options, sequential, Hessian
    from secateur.models.layers import weight_matrix
    from secateur.targets import select_modules
    from secateur.testing import tiny_model
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 120, (6, 16), generator=torch.Generator().manual_seed(0))
    marker, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]

    class Obs:
        def observer(self, name, module):
            return Hessian(weight_matrix(module).shape[1])
        def compress(self, name, module, stat, block):
            if block == 2 and marker != "-":
                open(marker, "w").close()
                time.sleep(60)
            H = stat.H + torch.eye(stat.H.shape[0]) * 1e-2
            w = weight_matrix(module)
            # an input-dependent rewrite, so that resuming with wrong inputs would show
            w.copy_(w @ H / H.diagonal().mean())
            return {}

    sequential(model, ids, select_modules(model, ["Linear"], ["lm_head"]), Obs(),
               Options(checkpoint_dir=None if ckpt == "-" else ckpt))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, out)
""")


def test_killed_run_resumes_bit_identical(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt, marker = tmp_path / "ckpt", tmp_path / "marker"
    subprocess.run([sys.executable, str(script), "-", "-", str(tmp_path / "straight.safetensors")],
                   check=True, env=env)
    child = subprocess.Popen([sys.executable, str(script), str(marker), str(ckpt), str(tmp_path / "never")], env=env)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached block 2"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert sorted(p.name for p in ckpt.glob("block-*")) == ["block-0000", "block-0001"]
    subprocess.run([sys.executable, str(script), "-", str(ckpt), str(tmp_path / "resumed.safetensors")],
                   check=True, env=env)
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_hessian_of_bfloat16_activations_matches_float64():
    """bf16 activations take the fast path (a float32 GEMM run on bf16 units where oneDNN has them):
    products of bf16 values are exact, so the result must agree with a float64 xᵀx to float32
    accumulation error, and the global matmul precision must be left as it was."""
    import torch.backends.mkldnn as mkldnn

    torch.manual_seed(0)
    before = mkldnn.matmul.fp32_precision if hasattr(mkldnn, "matmul") else None
    stat = Hessian(96)
    batches = [torch.randn(3, 50, 96).to(torch.bfloat16) for _ in range(3)]
    for x in batches:
        stat.update(x)
    flat = torch.cat([x.reshape(-1, 96) for x in batches]).double()
    ref = flat.T @ flat
    assert stat.tokens == 450
    assert float((stat.xtx.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    assert torch.allclose(stat.H.double(), ref * 2 / 450, rtol=1e-5, atol=1e-6)
    if before is not None:
        assert mkldnn.matmul.fp32_precision == before
