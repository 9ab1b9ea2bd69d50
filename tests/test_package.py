"""The package surface: a light import, tiny models of every family, the architecture table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """secateur's wheel, built once per module from this checkout (no build isolation: offline)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("secateur-*.whl")
    return wheel


def test_a_built_wheel_ships_every_file_the_native_build_reads(built_wheel):
    """A non-editable install must be able to compile the kernels: the wheel holds every source and
    header native.py compiles (it once lacked csrc/simd.h, so installs silently lost the kernels)."""
    import zipfile

    from secateur.runtime import native

    names = set(zipfile.ZipFile(built_wheel).namelist())
    needed = {f"secateur/runtime/csrc/{p.name}" for p in native.SOURCES + native.HEADERS}
    assert needed <= names, sorted(needed - names)


# Run by the fresh venv's python: builds the kernels from the installed csrc/ and runs one W8A8
# QuantLinear at one token through the native GEMV (forced by SECATEUR_KERNELS); prints a JSON report.
_WHEEL_SCRIPT = r"""
import json, logging
logging.basicConfig(level=logging.WARNING)
import torch
import secateur
from secateur.quant.rtn import RTNConfig
from secateur.runtime import dispatch, native
from secateur.runtime.linear import QuantLinear, reference_only
from secateur.testing import tiny_model

report = {"file": secateur.__file__, "csrc": str(native.SOURCES[0].parent), "available": native.available()}
report["ops"] = sorted(n for n in ("supported", "w8a8_gemv", "w4_gemv", "quantize_per_token", "w8a8_epilogue",
                                   "decode_attention", "w8a8_encoder_attention") if hasattr(torch.ops.secateur, n))
report["built"] = sorted(str(p) for p in native.cache_dir().glob("secateur_gemv_*/*.so"))
report["supported"] = bool(torch.ops.secateur.supported()) if "supported" in report["ops"] else None
if report["supported"]:
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    secateur.compress_(model, RTNConfig(bits=8, strategy="channel", activations="int8"))
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        y = layer(x)
        with reference_only():
            ref = layer(x)
        model(torch.randint(0, model.config.vocab_size, (1, 1)))
    report["kernel"] = layer.kernel_for(1)
    report["summary"] = dispatch.summary(model)
    report["max_diff"] = float((y - ref).abs().max())
    report["ref_max"] = float(ref.abs().max())
print(json.dumps(report))
"""


def test_a_wheel_installed_into_a_fresh_venv_builds_and_runs_the_native_kernels(built_wheel, tmp_path):
    """The wheel, pip-installed into a fresh venv (torch and the other dependencies borrowed from
    this venv's site-packages, never secateur's editable install), compiles secateur's C++ kernels
    from the csrc/ it ships into a fresh cache and runs a W8A8 QuantLinear at one token through the
    native GEMV, matching the reference path. This would fail if csrc/simd.h were not shipped (the
    wheel once lacked it: the build fails, the kernels silently fall back to torch's)."""
    import os
    import platform
    import sysconfig

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("secateur's native kernels are built only on Linux x86-64")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    # installed before this venv's site-packages is visible to it, so pip never sees the editable
    # secateur as already installed (nor could touch it)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "-q", str(built_wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    # a .pth line only adds the directory to sys.path: the .pth files in it (the editable
    # install's __editable__*.pth among them) are not processed, so src/ stays out of sight
    (Path(fresh_site) / "_parent_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SECATEUR_NATIVE", "SECATEUR_KERNELS")}
    env.update(SECATEUR_CACHE_DIR=str(tmp_path / "cache"), TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
               SECATEUR_KERNELS="w8a8=gemv", HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(python), "-c", _WHEEL_SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    where = f"{report}\n{proc.stderr[-3000:]}"

    installed = Path(fresh_site).resolve() / "secateur"
    assert Path(report["file"]).resolve().parent == installed, where  # the wheel, not the checkout's src/
    assert Path(report["csrc"]).resolve().is_relative_to(installed), where
    assert "w8a8_gemv" in report["ops"] and "w4_gemv" in report["ops"], where  # the build succeeded...
    assert report["built"] and all(Path(p).is_relative_to(tmp_path / "cache") for p in report["built"]), where
    if not report["supported"]:  # ...but this CPU cannot run what it built
        pytest.skip("this CPU lacks AVX-512 VNNI/BF16: secateur's native GEMV cannot run here (the kernels built)")
    assert report["available"], where
    assert report["kernel"] == "gemv", where
    assert report["summary"] == {"w8a8": {"1": "gemv"}}, where
    assert report["max_diff"] <= 1e-5 * max(report["ref_max"], 1.0), where
