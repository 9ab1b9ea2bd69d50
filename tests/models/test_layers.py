"""models/layers.py: the one place that knows how a layer holds its weight, checked on every family."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from secateur.models import layers
from secateur.models.arch import ARCHS, arch_of
from secateur.testing import FAMILIES, tiny_model

SRC = Path(__file__).resolve().parents[2] / "src" / "secateur"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_projection_reads_out_in_whatever_its_class(family):
    model = tiny_model(family)
    arch = arch_of(model).arch
    projections = {n: m for n, m in model.named_modules() if layers.is_projection(m)}
    assert projections
    for name, module in projections.items():
        w = layers.weight_matrix(module)
        x = torch.randn(3, layers.in_features(module))
        bias = module.bias if getattr(module, "bias", None) is not None else None
        # the [out, in] view computes what the module computes
        torch.testing.assert_close(module(x), torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-6)
        assert layers.out_features(module) == w.shape[0]
        assert layers.is_transposed(module) == (arch.transposed and type(module).__name__ == arch.layer_class)
        assert torch.equal(layers.stored(module, w), module.weight)


def test_the_table_decides_the_classes():
    assert set(layers.TRANSPOSED_CLASSES) == {a.layer_class for a in ARCHS.values() if a.transposed} == {"Conv1D"}
    assert layers.CLASS_ALIASES == {"Linear": ("Conv1D",)}


def test_slicing_keeps_each_class_s_size_attributes():
    from secateur.models.structure import slice_linear  # noqa: PLC0415  (the surgery uses layers.set_features)

    gpt2 = tiny_model("gpt2")
    conv = gpt2.get_submodule("transformer.h.0.mlp.c_fc")
    slice_linear(conv, "out", [0, 2, 5])
    assert conv.nf == 3 and layers.out_features(conv) == 3 and conv(torch.randn(2, conv.nx)).shape == (2, 3)
    llama = tiny_model("llama")
    lin = llama.get_submodule("model.layers.0.mlp.up_proj")
    slice_linear(lin, "in", [1, 3])
    assert lin.in_features == 2 and lin(torch.randn(2, 2)).shape[-1] == lin.out_features


def test_no_other_file_decides_conv1d_by_class_name():
    """Conv1D is named only by the architecture table and models/layers.py (it once was re-decided in
    seven files, and two of them disagreed: the GPT-2 bugs of issue 22)."""
    allowed = {SRC / "models" / "arch.py", SRC / "models" / "layers.py"}
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p not in allowed and re.search(r"""["']Conv1D["']""", p.read_text())]
    assert offenders == []
