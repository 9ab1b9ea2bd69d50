"""The package surface: a light import, tiny models of every family, the architecture table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import secateur
from secateur.errors import SecateurError
from secateur.models.arch import ARCHS, arch_of
from secateur.testing import FAMILIES, tiny_model


def test_import_is_light_and_silent():
    code = ("import logging, sys, json; logging.basicConfig(level=logging.DEBUG); import secateur; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('transformers','scipy','typer','rich','pyarrow','pandas','datasets','sentencepiece','safetensors')]; "
            "print(json.dumps(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []
    assert proc.stderr == ""


def test_public_surface():
    assert secateur.__version__
    assert callable(secateur.compress_) and callable(secateur.load) and callable(secateur.save)
    with pytest.raises(AttributeError):
        secateur.no_such_name  # noqa: B018


@pytest.mark.parametrize("family", FAMILIES)
def test_arch_table_resolves_every_family(family):
    model = tiny_model(family)
    facts = arch_of(model)
    arch = facts.arch
    blocks = arch.get_blocks(model)
    assert len(blocks) == facts.sizes["layers"] == 2
    for path in arch.projections().values():
        assert hasattr(blocks[0].get_submodule(path), "weight")
    for emb in arch.get_embeddings(model):
        assert isinstance(emb, torch.nn.Embedding)
    assert (arch.get_head(model) is None) == (facts.kind == "encoder")
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        out = model(ids)
    assert torch.isfinite(out[0]).all()


def test_unsupported_architecture_message():
    class Other(torch.nn.Module):
        pass

    with pytest.raises(SecateurError, match=r"unsupported architecture 'Other'; supported model types: .*'llama'"):
        arch_of(Other())
    assert arch_of(Other(), strict=False) is None
    assert set(FAMILIES) <= set(ARCHS)


def test_a_built_wheel_ships_every_file_the_native_build_reads(tmp_path):
    """A non-editable install must be able to compile the kernels: the wheel holds every source and
    header native.py compiles (it once lacked csrc/simd.h, so installs silently lost the kernels)."""
    import zipfile
    from pathlib import Path

    from secateur.runtime import native

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("secateur-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"secateur/runtime/csrc/{p.name}" for p in native.SOURCES + native.HEADERS}
    assert needed <= names, sorted(needed - names)
