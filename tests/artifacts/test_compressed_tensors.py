"""Quantized artifacts in the compressed-tensors format (secateur.artifacts.compressed_tensors).

Tiny Llama/Qwen2 models get their block Linears replaced by QuantLinear modules from a plain RTN
(secateur.quant.primitives.quantize_weight). Each is saved with ``secateur.save`` and then

(a) read back by ``secateur.load``: the same integers, scales, zero points and biases, and
    bit-identical logits;
(b) loaded by stock ``transformers.AutoModelForCausalLM.from_pretrained`` (compressed-tensors
    installed), which decompresses every weight to ``(q - z) * s`` in float32 on the first
    forward — the same operations as ``primitives.dequantize`` and QuantLinear's reference
    path — so its logits equal, bit for bit, those of a dense model carrying those weights and
    those of our QuantLinear model on its reference path (its CPU kernels compute weight-only
    layers in bfloat16, which is QuantLinear's business, not the format's). For W8A8 it also
    fake-quantizes every Linear's input per token (``s = amax / 127.5``, round, clamp to
    [-128, 127]): the dense reference does the same and stays bit-identical; our W8A8
    QuantLinear quantizes on the ``amax / 127`` grid (vLLM's), each activation may land one step
    apart, and the logits agree to 2% of their largest magnitude (measured 0.6%);
(c) described by the card: bits per layer and the bytes each layer really takes in the
    safetensors file, which shrink by the expected factor.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("compressed_tensors")

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

import secateur  # noqa: E402
from secateur.errors import SecateurError  # noqa: E402
from secateur.artifacts import compressed_tensors as formats  # noqa: E402
from secateur.runtime.linear import QuantLinear, reference_only  # noqa: E402
from secateur.quant.primitives import Scheme, dequantize, quantize_weight  # noqa: E402
from secateur.testing import tiny_model  # noqa: E402


# --- QuantLinear ---------------------------------------------------------------------------------

@pytest.fixture
def quant_linear():
    return QuantLinear


# --- the reference ------------------------------------------------------------------------------

def scheme_of(module) -> Scheme:
    bits, group = module.bits, module.group_size
    return Scheme(bits, True, "group", group) if group else Scheme(bits, True, "channel")


def zero_point(module) -> torch.Tensor:
    zp = module.weight_zero_point
    return torch.zeros_like(module.weight_scale, dtype=torch.int8) if zp is None else zp


def reference_weight(module) -> torch.Tensor:
    """``(q - z) * s`` in float32, from the buffers alone (primitives.dequantize)."""
    return dequantize(module.weight_q, module.weight_scale, zero_point(module), scheme_of(module))


def ct_token_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic symmetric per-token int8 QDQ (calculate_qparams + fake_quantize)."""
    amax = torch.maximum(x.amin(-1, keepdim=True).clamp_max(0).abs(), x.amax(-1, keepdim=True).clamp_min(0))
    scale = amax / torch.tensor(255.0 / 2, dtype=x.dtype)
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return torch.round(torch.clamp(x / scale, -128, 127)) * scale


def reference_model(quantized: nn.Module, family: str) -> nn.Module:
    """A dense copy: every QuantLinear becomes an nn.Linear with the dequantized weight (W8A8:
    and compressed-tensors' per-token fake quantization of its input)."""
    return densified(quantized, formats.is_quantized, reference_weight,
                     lambda m: ct_token_fake_quant if m.activation == "int8" else None).eval()


def densified(quantized: nn.Module, which, weight_of, fake_quant_of) -> nn.Module:
    """A copy with every module ``which`` selects replaced by an nn.Linear of weight ``weight_of(m)``
    whose input first goes through ``fake_quant_of(m)`` (None: unchanged)."""
    dense = copy.deepcopy(quantized)
    for name, module in list(dense.named_modules()):
        if not which(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight_of(module))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        fake_quant = fake_quant_of(module)
        if fake_quant is not None:
            linear.register_forward_pre_hook(lambda _, args, f=fake_quant: (f(args[0]),))
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent), child, linear)
    return dense


# --- the models ---------------------------------------------------------------------------------

W4G16 = (Scheme(4, True, "group", 16), None)
W4G16_ASYM = (Scheme(4, False, "group", 16), None)
W4_CHANNEL = (Scheme(4, True, "channel"), None)
W3G16_ASYM = (Scheme(3, False, "group", 16), None)
W8A16 = (Scheme(8, True, "channel"), None)
W8A8 = (Scheme(8, True, "channel"), "int8")
W8A8_ASYM = (Scheme(8, False, "channel"), "int8")


def mixed(name: str):
    """Attention W8A16, MLP W4 group 16, and the last block's down_proj W8A8."""
    if name.endswith("layers.1.mlp.down_proj"):
        return W8A8
    return W8A16 if ".self_attn." in name else W4G16


PLANS = {
    "w4g16": lambda name: W4G16,
    "w4g16-asym": lambda name: W4G16_ASYM,
    "w4-channel": lambda name: W4_CHANNEL,
    "w3g16-asym": lambda name: W3G16_ASYM,
    "w8a8": lambda name: W8A8,
    "w8a8-asym": lambda name: W8A8_ASYM,
    "mixed": mixed,
}


def rtn(model: nn.Module, plan, cls) -> nn.Module:
    """Replace every Linear inside the blocks by a QuantLinear of its round-to-nearest integers."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or ".layers." not in name:
            continue
        scheme, activation = plan(name)
        q, scale, zero = quantize_weight(module.weight.detach().float(), scheme)
        group = scheme.group_size if scheme.strategy == "group" else None
        bias = None if module.bias is None else module.bias.detach().clone()
        new = cls.from_quantized(q, scale, zero, scheme.bits, group, bias, activation)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
CASES = [("llama", plan) for plan in PLANS] + [("qwen2", "w4g16-asym"), ("qwen2", "w8a8"), ("qwen2", "mixed")]


@pytest.fixture
def saved(request, tmp_path, quant_linear):
    family, plan = request.param
    model = rtn(tiny_model(family), PLANS[plan], quant_linear)
    path = secateur.save(model, tmp_path / f"{family}-{plan}")
    return family, plan, model, path


def tensors_of(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


# --- (a) secateur.load --------------------------------------------------------------------------

@pytest.mark.parametrize("saved", CASES, indirect=True, ids=[f"{f}-{p}" for f, p in CASES])
def test_secateur_load_gives_the_same_integers_and_outputs(saved, quant_linear):
    family, plan, model, path = saved
    loaded = secateur.load(path).model
    ours, theirs = formats.quantized_modules(model), formats.quantized_modules(loaded)
    assert list(theirs) == list(ours) and len(ours) == 14
    for name, module in ours.items():
        back = theirs[name]
        assert type(back) is quant_linear
        assert (back.bits, back.group_size, back.activation) == (module.bits, module.group_size, module.activation)
        assert back.weight_q.dtype == torch.int8 and torch.equal(back.weight_q, module.weight_q)
        assert back.weight_scale.dtype == module.weight_scale.dtype
        assert torch.equal(back.weight_scale, module.weight_scale)
        assert torch.equal(zero_point(back), zero_point(module))
        assert (back.bias is None) == (module.bias is None)
        if module.bias is not None:
            assert torch.equal(back.bias, module.bias)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert "quantization_config" not in loaded.config.to_dict()  # the in-memory model is QuantLinear, not CT's


# --- (b) stock transformers ---------------------------------------------------------------------

ASYMMETRIC = ("w4g16-asym", "w3g16-asym")


def stock(path, plan):
    """Stock transformers' load. Asymmetric pack-quantized checkpoints (zero points packed along the
    output dimension, as compressed-tensors' own compressor writes them and vLLM reads them) need
    ``dequantize=True`` with compressed-tensors 0.20 / transformers 5.23: on the default path the
    quantizer lays the modules out on the meta device, where compressed-tensors skips packing the
    zero point, so the checkpoint's packed zero point mismatches, and decompression then refuses
    the int8 one ("Expected torch.int32")."""
    if plan in ASYMMETRIC:
        return dequantize_on_load(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def dequantize_on_load(path):
    with warnings.catch_warnings():  # "the quantization_config from the model will be used" (only dequantize is read)
        warnings.simplefilter("ignore", UserWarning)
        config = transformers.CompressedTensorsConfig(dequantize=True)
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


@pytest.mark.parametrize("saved", CASES, indirect=True, ids=[f"{f}-{p}" for f, p in CASES])
def test_stock_transformers_loads_it(saved):
    family, plan, model, path = saved
    loaded = stock(path, plan)
    assert loaded.dtype == torch.float32
    got = logits(loaded, IDS)
    # compressed-tensors decompresses every weight to (q - z) * s in float32 — the same operations
    # in the same order as primitives.dequantize — so the reference dense model is bit-identical,
    # its activations fake-quantized per token the way compressed-tensors does where the scheme is W8A8
    reference = reference_model(model, family)
    assert torch.equal(got, logits(reference, IDS))
    for name, module in formats.quantized_modules(model).items():
        layer = loaded.get_submodule(name)
        assert torch.equal(layer.weight, reference_weight(module))
        if plan not in ASYMMETRIC:  # the compressed-tensors module, decompressed on the first forward
            assert layer.quantization_status == "decompressed"
    with reference_only():  # QuantLinear's own reference: dequantize, then F.linear (no bf16 kernels)
        ours = logits(model, IDS)
    if plan in ("w8a8", "w8a8-asym", "mixed"):
        # our W8A8 runs activations on the amax/127 grid (vLLM's), compressed-tensors' fake
        # quantization on amax/127.5: each activation may land one step apart
        assert (got - ours).abs().max() <= 0.02 * ours.abs().max()  # measured: 0.6% (qwen2), 0.06% (mixed)
    else:  # weight-only: the same weights, the same F.linear
        assert torch.equal(got, ours)


def test_stock_transformers_dequantize_on_load_drops_activation_quantization(tmp_path, quant_linear):
    """``dequantize=True`` decompresses while loading and leaves plain nn.Linear modules: a W8A8
    checkpoint then runs as W8A16 (no activation quantization). (That path applies the first
    config group's scheme to every module in transformers 5.23, so mixed precision needs the
    default path.)"""
    model = rtn(tiny_model("qwen2"), PLANS["w8a8"], quant_linear)
    path = secateur.save(model, tmp_path / "a")
    loaded = dequantize_on_load(path)
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear
    weight_only = reference_model(model, "qwen2")
    for module in weight_only.modules():
        module._forward_pre_hooks.clear()
    assert torch.equal(logits(loaded, IDS), logits(weight_only, IDS))


# --- (c) the config and the card ---------------------------------------------------------------

def quantization_config(path):
    """config.json's quantization_config, raw and as compressed-tensors parses it, after the checks
    every saved checkpoint must pass (compressed-tensors, compressed, the head left out)."""
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == "compressed-tensors" and raw["quantization_status"] == "compressed"
    assert raw["ignore"] == ["lm_head"]
    return raw, QuantizationConfig.model_validate(raw)


@pytest.mark.parametrize("saved", [("llama", "mixed"), ("qwen2", "w4g16-asym")], indirect=True,
                         ids=["llama-mixed", "qwen2-w4g16-asym"])
def test_config_json_is_what_compressed_tensors_expects(saved):
    from compressed_tensors.compressors import BaseCompressor

    family, plan, model, path = saved
    raw, parsed = quantization_config(path)
    tensors = tensors_of(path)
    names = formats.quantized_modules(model)
    if plan == "mixed":
        assert raw["format"] == "mixed-precision"
        assert len(parsed.config_groups) == 3
        by_targets = {tuple(g.targets): g for g in parsed.config_groups.values()}
        w8a8 = by_targets[("model.layers.1.mlp.down_proj",)]
        assert w8a8.format == "int-quantized" and w8a8.input_activations.strategy == "token"
        assert w8a8.input_activations.dynamic is True and w8a8.weights.num_bits == 8
        attention = by_targets[(r"re:^model\.layers\.\d+\.self_attn\.q_proj$",
                                r"re:^model\.layers\.\d+\.self_attn\.k_proj$",
                                r"re:^model\.layers\.\d+\.self_attn\.v_proj$",
                                r"re:^model\.layers\.\d+\.self_attn\.o_proj$")]
        assert attention.format == "pack-quantized" and attention.weights.num_bits == 8
        assert attention.weights.strategy == "channel" and attention.input_activations is None
        mlp = next(g for g in parsed.config_groups.values() if g not in (w8a8, attention))
        assert mlp.weights.num_bits == 4 and mlp.weights.group_size == 16 and mlp.weights.strategy == "group"
        assert "model.layers.0.mlp.down_proj" in mlp.targets and "model.layers.1.mlp.down_proj" not in mlp.targets
    else:
        assert raw["format"] == "pack-quantized" and len(parsed.config_groups) == 1
        (group,) = parsed.config_groups.values()
        assert group.weights.symmetric is False and group.weights.group_size == 16
    from compressed_tensors.utils.match import is_match

    for name, module in names.items():
        (scheme,) = [g for g in parsed.config_groups.values() if is_match(name, module, g.targets)]
        local = {k[len(name) + 1:] for k in tensors if k.startswith(name + ".")} - {"bias"}
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        assert local == set(compressor.compression_param_names(scheme))
        out, inp = module.weight_q.shape
        groups = inp // module.group_size if module.group_size else 1
        if scheme.format == "pack-quantized":
            b = module.bits
            assert tensors[f"{name}.weight_packed"].dtype == torch.int32
            assert tensors[f"{name}.weight_packed"].shape == (out, -(-inp * b // 32))
            assert tensors[f"{name}.weight_shape"].tolist() == [out, inp]
            if not scheme.weights.symmetric:
                assert tensors[f"{name}.weight_zero_point"].dtype == torch.int32
                assert tensors[f"{name}.weight_zero_point"].shape == (-(-out * b // 32), groups)
        else:
            assert tensors[f"{name}.weight"].dtype == torch.int8 and tensors[f"{name}.weight"].shape == (out, inp)
        assert tensors[f"{name}.weight_scale"].shape == (out, groups)
    assert not any(k.endswith((".weight_q", ".weight")) and k.rsplit(".", 1)[0] in names and
                   names[k.rsplit(".", 1)[0]].activation is None for k in tensors)
    assert "quantization_config" not in model.config.to_dict()  # restored after the save


def dense_artifact(tmp_path, family):
    return secateur.save(tiny_model(family), tmp_path / f"dense-{family}")


@pytest.mark.parametrize("saved", [("llama", "w4g16"), ("llama", "w4-channel"), ("llama", "mixed")],
                         indirect=True, ids=["w4g16", "w4-channel", "mixed"])
def test_card_reports_bits_and_true_bytes(saved, tmp_path):
    family, plan, model, path = saved
    card = secateur.artifacts.verify(path)
    entry = card["quantization"]
    assert entry["format"] == "compressed-tensors" and entry["modules"] == 14 and entry["stock_transformers"] is True
    layers = entry["layers"]
    tensors = tensors_of(path)
    for name, module in formats.quantized_modules(model).items():
        assert layers[name]["bits"] == module.bits and layers[name]["group_size"] == module.group_size
        assert layers[name]["activations"] == module.activation
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))
        assert layers[name]["bytes"] == stored  # what the layer really takes in the file
    weights = sum(e["bytes"] for n, e in card["files"].items() if n.endswith(".safetensors"))
    assert entry["weights_bytes"] == weights == sum(p.stat().st_size for p in path.glob("*.safetensors"))
    dense = dense_artifact(tmp_path, family)
    dense_weights = sum(p.stat().st_size for p in dense.glob("*.safetensors"))
    # the file shrinks by what the quantized layers saved (headers differ by a few hundred bytes)
    saved_bytes = entry["quantized_dense_bytes"] - entry["quantized_bytes"]
    assert abs((dense_weights - weights) - saved_bytes) < 4096
    if plan == "w4g16":
        # 4 bits + a float32 scale per 16 weights: 1/8 + 1/16 of float32
        assert entry["bits"] == {"4": 14}
        # (plus 16 bytes of weight_shape per layer)
        assert entry["quantized_bytes"] == entry["quantized_dense_bytes"] * (1 / 8 + 1 / 16) + 16 * 14
    if plan == "w4-channel":
        # 4 bits + a float32 scale per row of 32 (the tiny model's width; 1/8 + 1/4096 at 4096)
        assert entry["quantized_ratio"] == pytest.approx(1 / 8 + 1 / 32, abs=0.002)
    if plan == "mixed":
        # attention W8A16 (8 layers), MLP W4 (5), the last down_proj W8A8
        assert entry["bits"] == {"4": 5, "8": 9} and entry["compression_format"] == "mixed-precision"
        assert layers["model.layers.1.mlp.down_proj"]["activations"] == "int8"


# --- structure and storage options still compose ----------------------------------------------

def test_structured_then_quantized_round_trip(tmp_path, quant_linear):
    from secateur.models.structure import remove_channels

    model = tiny_model("llama")
    remove_channels(model, 0, list(range(48)))  # block 0 keeps 48 of 64 MLP channels: a recorded layout
    rtn(model, PLANS["w4g16"], quant_linear)
    path = secateur.save(model, tmp_path / "a")
    card = secateur.artifacts.verify(path)
    assert card["layout"]["shapes"]["model.layers.0.mlp.down_proj.weight"] == [32, 48]
    loaded = secateur.load(path).model
    assert loaded.model.layers[0].mlp.down_proj.weight_q.shape == (32, 48)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_sparse_auto_leaves_quantized_layers_alone(tmp_path, quant_linear):
    model = rtn(tiny_model("llama"), PLANS["w4g16"], quant_linear)
    with torch.no_grad():
        model.lm_head.weight[:, ::2] = 0  # a pruned dense head next to the quantized blocks
    path = secateur.save(model, tmp_path / "a", sparse="auto")
    card = secateur.artifacts.verify(path)
    assert card["storage"]["format"] == "bitmask-v1" and card["storage"]["sparse_modules"] == 1
    assert torch.equal(logits(secateur.load(path).model, IDS), logits(model, IDS))


def test_gpt2_conv1d_round_trips_and_is_flagged_not_stock_loadable(tmp_path, quant_linear, caplog):
    """GPT-2's projections are Conv1D, which compressed-tensors does not quantize: stock
    transformers would initialise them at random, so the card says so; secateur.load reads them."""
    from secateur.models.layers import weight_matrix

    model = tiny_model("gpt2")
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            q, scale, zero = quantize_weight(weight_matrix(module).detach().float(), W4G16[0])
            new = quant_linear.from_quantized(q, scale, zero, 4, 16, module.bias.detach().clone(), None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    with caplog.at_level("WARNING", logger="secateur.artifacts.compressed_tensors"):
        path = secateur.save(model, tmp_path / "a")
    assert "stock transformers would load them at random" in caplog.text
    entry = secateur.artifacts.verify(path)["quantization"]
    assert entry["stock_transformers"] is False and len(entry["not_stock_loadable"]) == 8
    assert torch.equal(logits(secateur.load(path).model, IDS), logits(model, IDS))


# --- errors -------------------------------------------------------------------------------------

def plain_copy(path, tmp_path, edit):
    """The artifact without its card (so that no hash guards config.json), config edited."""
    out = tmp_path / "edited"
    shutil.copytree(path, out)
    (out / "compression.json").unlink()
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("edit, needle", [
    (lambda q: q.update(format="marlin-24"), "format 'marlin-24' is not supported"),
    (lambda q: q["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"),
     "format 'nvfp4-pack-quantized' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits="four"), "not a valid compressed-tensors"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "weights are not supported"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status 'frozen'"),
    (lambda q: q.update(config_groups={}), "no config_groups"),
], ids=["marlin-24", "nvfp4", "garbage-bits", "float-weights", "frozen", "empty"])
def test_unsupported_quantization_config_is_one_line(tmp_path, quant_linear, edit, needle):
    model = rtn(tiny_model("llama"), PLANS["w4g16"], quant_linear)
    path = plain_copy(secateur.save(model, tmp_path / "a"), tmp_path, edit)
    with pytest.raises(SecateurError) as info:
        secateur.load(path)
    message = str(info.value)
    assert "\n" not in message and needle in message
    assert "'pack-quantized'" in message and "'int-quantized'" in message


def test_missing_targets_are_reported(tmp_path, quant_linear):
    model = rtn(tiny_model("llama"), PLANS["w4g16"], quant_linear)

    def edit(q):
        q["config_groups"]["group_0"]["targets"] = ["re:^nothing$"]
    path = plain_copy(secateur.save(model, tmp_path / "a"), tmp_path, edit)
    with pytest.raises(SecateurError, match="no Linear module of the model matches"):
        secateur.load(path)


def test_without_compressed_tensors_the_error_says_how_to_install(tmp_path, quant_linear, monkeypatch):
    model = rtn(tiny_model("llama"), PLANS["w4g16"], quant_linear)
    for name in [n for n in sys.modules if n == "compressed_tensors" or n.startswith("compressed_tensors.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # import fails as if not installed
    with pytest.raises(SecateurError, match=r"pip install 'secateur\[quant\]'"):
        secateur.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())


# --- FP8 (FP8Linear, format float-quantized) -----------------------------------------------------
#
# FP8Linear modules are written as compressed-tensors' float-quantized layout: ``weight`` in
# float8_e4m3fn, ``weight_scale`` float32 ``[out, 1]`` per channel or ``[1]`` per tensor. Stock
# transformers (CPU) decompresses each weight to ``weight.float() * scale`` on the first forward
# and, where the scheme has FP8 activations, fake-quantizes every Linear's input per token: scale
# ``amax / 448``, ``x / scale`` clamped to [-448, 448], cast to float8_e4m3fn and back, times the
# scale (calculate_qparams + _quantize_dequantize). The dense reference below does exactly that
# and is bit-identical, and so is FP8Linear's reference path (``reference_only()``); its own
# forward (an FP8 GEMM, scales applied to the float32 accumulator) differs by float rounding only.

from secateur import compress_  # noqa: E402
from secateur.quant.fp8 import FP8Config
from secateur.runtime.fp8_linear import FP8Linear  # noqa: E402

FP8_MAX = 448.0


def fp8(model, fmt="e4m3", strategy="channel", activations="fp8", targets=("Linear",)):
    compress_(model, FP8Config(format=fmt, strategy=strategy, activations=activations, targets=targets))
    return model.eval()


def ct_fp8_token_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic symmetric per-token float8 QDQ on a [batch, seq, features] input."""
    amax = torch.maximum(x.amin(-1, keepdim=True).clamp_max(0).abs(), x.amax(-1, keepdim=True).clamp_min(0))
    scale = amax / torch.tensor(FP8_MAX, dtype=x.dtype)
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fp8_reference_model(quantized: nn.Module) -> nn.Module:
    """A dense copy: every FP8Linear an nn.Linear with ``weight_fp8.float() * weight_scale`` (FP8
    activations: and compressed-tensors' per-token fake quantization of its input); QuantLinear
    modules as in :func:`reference_model`."""
    dense = densified(quantized, lambda m: isinstance(m, FP8Linear), lambda m: m.weight_fp8.float() * m.weight_scale,
                      lambda m: ct_fp8_token_fake_quant if m.activations == "fp8" else None)
    return reference_model(dense, "llama")


def fp8_mixed(model):
    """MLP in FP8 (per tensor, FP8 activations), attention W4 group 16 (first block) and W8A16."""
    fp8(model, strategy="tensor", targets=(r"re:\.mlp\.",))
    return rtn(model, lambda name: W8A16 if ".layers.1.self_attn." in name else W4G16, QuantLinear)


FP8_PLANS = {
    "e4m3-channel-a8": lambda m: fp8(m),
    "e4m3-tensor-a8": lambda m: fp8(m, strategy="tensor"),
    "e4m3-channel-w": lambda m: fp8(m, activations=None),
    "e4m3-tensor-w": lambda m: fp8(m, strategy="tensor", activations=None),
    "e5m2-channel-a8": lambda m: fp8(m, fmt="e5m2"),
    "e5m2-tensor-w": lambda m: fp8(m, fmt="e5m2", strategy="tensor", activations=None),
    "mixed": fp8_mixed,
}
FP8_CASES = [("llama", p) for p in FP8_PLANS] + [("qwen2", "e4m3-channel-a8"), ("qwen2", "e4m3-tensor-w")]
STOCK_FP8_CASES = [c for c in FP8_CASES if "e5m2" not in c[1]]


@pytest.fixture
def fp8_saved(request, tmp_path):
    family, plan = request.param
    model = FP8_PLANS[plan](tiny_model(family))
    path = secateur.save(model, tmp_path / f"{family}-{plan}")
    return family, plan, model, path


def fp8_modules(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # float8 compared bit for bit


@pytest.mark.parametrize("fp8_saved", FP8_CASES, indirect=True, ids=[f"{f}-{p}" for f, p in FP8_CASES])
def test_fp8_secateur_load_gives_the_same_bits_and_outputs(fp8_saved):
    family, plan, model, path = fp8_saved
    loaded = secateur.load(path).model
    ours, theirs = fp8_modules(model), fp8_modules(loaded)
    assert list(theirs) == list(ours) and len(ours) == (6 if plan == "mixed" else 14)
    for name, module in ours.items():
        back = theirs[name]
        assert back.weight_fp8.dtype == module.weight_fp8.dtype
        assert torch.equal(bits_of(back.weight_fp8), bits_of(module.weight_fp8))
        assert back.weight_scale.dtype == torch.float32 and torch.equal(back.weight_scale, module.weight_scale)
        assert (back.activations, back.strategy) == (module.activations, module.strategy)
        assert (back.bias is None) == (module.bias is None)
        if module.bias is not None:
            assert torch.equal(back.bias, module.bias)
    if plan == "mixed":
        assert [type(m) for m in formats.quantized_modules(loaded).values()] == \
            [type(m) for m in formats.quantized_modules(model).values()]
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    with reference_only():
        assert torch.equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.parametrize("fp8_saved", STOCK_FP8_CASES, indirect=True, ids=[f"{f}-{p}" for f, p in STOCK_FP8_CASES])
def test_fp8_stock_transformers_loads_it(fp8_saved):
    family, plan, model, path = fp8_saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert loaded.dtype == torch.float32
    got = logits(loaded, IDS)
    assert torch.equal(got, logits(fp8_reference_model(model), IDS))
    for name, module in fp8_modules(model).items():
        layer = loaded.get_submodule(name)
        assert type(layer) is nn.Linear and layer.quantization_status == "decompressed"
        assert torch.equal(layer.weight, module.dequantized_weight())
        assert (layer.quantization_scheme.input_activations is not None) == (module.activations == "fp8")
    with reference_only():  # FP8Linear's reference path: compressed-tensors' operations, in its order
        assert torch.equal(got, logits(model, IDS))
    ours = logits(model, IDS)  # the FP8 GEMM: the same products, scales applied after the accumulation
    if plan == "mixed":
        return  # QuantLinear's bf16 weight-only kernels: test_stock_transformers_loads_it
    if plan.endswith("-w"):
        assert torch.equal(got, ours)
    else:
        # float32 rounding only (measured ~1e-7 of the largest logit); one activation landing on a
        # neighbouring FP8 value would move logits by ~1e-3, so 1e-5 catches a different grid
        assert (got - ours).abs().max() <= 1e-5 * ours.abs().max()


def test_fp8_stock_scales_a_2d_input_per_tensor(tmp_path):
    """compressed-tensors 0.20's "token" strategy reduces over the dims after the first two: OPT
    flattens its MLP input to [tokens, features], which therefore gets one scale for the whole
    tensor. FP8Linear's reference path does the same (so stock outputs stay bit-identical); its
    FP8 GEMM scales each token on its own (as vLLM does), so on OPT the two differ by more than
    rounding."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7).unsqueeze(1)
    scale, zero = compute_dynamic_scales_and_zp(x, args, None)
    assert scale.shape == (1,)  # one scale for the 2-D tensor
    assert compute_dynamic_scales_and_zp(x[None], args, None)[0].shape == (1, 6, 1)  # per token in 3-D
    model = fp8(tiny_model("opt"))
    layer = model.model.decoder.layers[0].fc1
    expected = F.linear(fake_quantize(x, scale, zero, args), layer.dequantized_weight(), layer.bias)
    with reference_only():
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x[None]), F.linear(ct_fp8_token_fake_quant(x[None]), layer.dequantized_weight(),
                                                    layer.bias))
    path = secateur.save(model, tmp_path / "opt")
    stock = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with reference_only():
        assert torch.equal(logits(stock, IDS), logits(model, IDS))


@pytest.mark.parametrize("fp8_saved", [("llama", "mixed"), ("qwen2", "e4m3-channel-a8"), ("llama", "e4m3-tensor-w")],
                         indirect=True, ids=["llama-mixed", "qwen2-e4m3-channel-a8", "llama-e4m3-tensor-w"])
def test_fp8_config_json_and_tensors(fp8_saved):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils.match import is_match

    family, plan, model, path = fp8_saved
    raw, parsed = quantization_config(path)
    float_groups = [g for g in parsed.config_groups.values() if g.weights.type == "float"]
    assert len(float_groups) == 1
    (group,) = float_groups
    assert group.format == "float-quantized" and group.weights.num_bits == 8 and group.weights.symmetric
    assert group.weights.dynamic is False and group.weights.group_size is None
    if plan == "mixed":
        assert raw["format"] == "mixed-precision" and len(parsed.config_groups) == 3
        assert group.targets == [r"re:^model\.layers\.\d+\.mlp\.gate_proj$", r"re:^model\.layers\.\d+\.mlp\.up_proj$",
                                 r"re:^model\.layers\.\d+\.mlp\.down_proj$"]
        assert sorted(g.format for g in parsed.config_groups.values()) == ["float-quantized", "pack-quantized",
                                                                           "pack-quantized"]
    else:
        assert raw["format"] == "float-quantized" and len(parsed.config_groups) == 1
    strategy = "channel" if "channel" in plan else "tensor"
    assert group.weights.strategy == strategy
    a = group.input_activations
    if plan.endswith("-w"):
        assert a is None
    else:
        assert (a.type, a.num_bits, a.strategy, a.dynamic, a.symmetric) == ("float", 8, "token", True, True)
    tensors = tensors_of(path)
    for name, module in fp8_modules(model).items():
        (scheme,) = [g for g in parsed.config_groups.values() if is_match(name, module, g.targets)]
        assert scheme is group
        local = {k[len(name) + 1:] for k in tensors if k.startswith(name + ".")} - {"bias"}
        assert local == set(BaseCompressor.get_value_from_registry(scheme.format).compression_param_names(scheme))
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert weight.dtype == torch.float8_e4m3fn and weight.shape == (module.out_features, module.in_features)
        assert torch.equal(bits_of(weight), bits_of(module.weight_fp8))
        assert scale.dtype == torch.float32
        assert scale.shape == ((module.out_features, 1) if strategy == "channel" else (1,))
        assert torch.equal(scale.reshape(-1, 1).expand(module.out_features, 1), module.weight_scale)
    assert not any(k.endswith(".weight_fp8") for k in tensors)


@pytest.mark.parametrize("fp8_saved", [("llama", "e4m3-channel-a8"), ("llama", "e4m3-tensor-w"), ("llama", "mixed")],
                         indirect=True, ids=["e4m3-channel-a8", "e4m3-tensor-w", "mixed"])
def test_fp8_card_reports_bits_format_and_true_bytes(fp8_saved, tmp_path):
    family, plan, model, path = fp8_saved
    entry = secateur.artifacts.verify(path)["quantization"]
    assert entry["stock_transformers"] is True and entry["modules"] == 14
    tensors = tensors_of(path)
    layers = entry["layers"]
    for name, module in fp8_modules(model).items():
        layer = layers[name]
        assert (layer["bits"], layer["type"], layer["fp8_format"], layer["format"]) == \
            (8, "float", "e4m3", "float-quantized")
        assert layer["strategy"] == module.strategy and layer["activations"] == module.activations
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))
        assert layer["bytes"] == stored
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert entry["weights_bytes"] == weights
    dense = sum(p.stat().st_size for p in dense_artifact(tmp_path, family).glob("*.safetensors"))
    assert abs((dense - weights) - (entry["quantized_dense_bytes"] - entry["quantized_bytes"])) < 4096
    if plan == "e4m3-channel-a8":  # a byte a weight + a float32 scale per row: 1/4 + 1/in of float32
        assert entry["bits"] == {"8": 14} and entry["compression_format"] == "float-quantized"
        modules = fp8_modules(model).values()
        assert entry["quantized_bytes"] == sum(m.out_features * (m.in_features + 4) for m in modules)
        assert entry["quantized_ratio"] == pytest.approx(1 / 4 + 1 / 32, abs=0.02)
    if plan == "e4m3-tensor-w":  # a byte a weight + one float32 scale a layer
        assert entry["quantized_bytes"] == entry["quantized_dense_bytes"] / 4 + 4 * 14
    if plan == "mixed":
        assert entry["bits"] == {"4": 4, "8": 10} and entry["compression_format"] == "mixed-precision"


def test_fp8_e5m2_round_trips_but_is_flagged_not_stock_loadable(tmp_path, caplog):
    """compressed-tensors' 8-bit float is E4M3 (pytorch_dtype, the [-448, 448] range, vLLM): an
    E5M2 checkpoint keeps its float8_e5m2 tensors, which secateur.load reads back exactly, and
    transformers would cast to E4M3 (wrong values), so the save warns and the card says so."""
    model = fp8(tiny_model("llama"), fmt="e5m2")
    with caplog.at_level("WARNING", logger="secateur.artifacts.compressed_tensors"):
        path = secateur.save(model, tmp_path / "a")
    assert "E5M2" in caplog.text and "use format e4m3" in caplog.text
    entry = secateur.artifacts.verify(path)["quantization"]
    assert entry["stock_transformers"] is False and len(entry["not_stock_loadable"]) == 14
    assert entry["not_stock_loadable_reasons"] == [formats.E5M2]
    assert {layer["fp8_format"] for layer in entry["layers"].values()} == {"e5m2"}
    tensors = tensors_of(path)
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e5m2
    assert torch.equal(logits(secateur.load(path).model, IDS), logits(model, IDS))


def test_fp8_on_gpt2_conv1d_round_trips_and_is_flagged(tmp_path):
    model = fp8(tiny_model("gpt2"))
    assert len(fp8_modules(model)) == 8
    path = secateur.save(model, tmp_path / "a")
    entry = secateur.artifacts.verify(path)["quantization"]
    assert entry["stock_transformers"] is False and entry["not_stock_loadable_reasons"] == [formats.NOT_LINEAR]
    loaded = secateur.load(path).model
    assert all(torch.equal(bits_of(a.weight_fp8), bits_of(b.weight_fp8))
               for a, b in zip(fp8_modules(loaded).values(), fp8_modules(model).values()))
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.parametrize("edit, needle", [
    (lambda g: g["weights"].update(strategy="group", group_size=16), "weights are not supported"),
    (lambda g: g["weights"].update(num_bits=4), "weights are not supported"),
    (lambda g: g["input_activations"].update(type="int"), "input activations int 8-bit"),
    (lambda g: g["input_activations"].update(strategy="tensor", dynamic=False), "input activations float 8-bit"),
    (lambda g: g.update(format="pack-quantized"), "weights are not supported"),
], ids=["group", "fp4", "int-activations", "static-activations", "packed"])
def test_fp8_unsupported_config_is_one_line(tmp_path, edit, needle):
    path = secateur.save(fp8(tiny_model("llama")), tmp_path / "a")
    path = plain_copy(path, tmp_path, lambda q: edit(q["config_groups"]["group_0"]))
    with pytest.raises(SecateurError) as info:
        secateur.load(path)
    message = str(info.value)
    assert "\n" not in message and needle in message and "'float-quantized'" in message


def test_fp8_tensor_strategy_with_unequal_rows_is_refused(tmp_path):
    model = fp8(tiny_model("llama"), strategy="tensor")
    layer = model.model.layers[0].mlp.up_proj
    layer.weight_scale = layer.weight_scale.clone()  # (apply stores the tensor scale expanded: one element)
    with torch.no_grad():
        layer.weight_scale[0] *= 2
    with pytest.raises(SecateurError, match="strategy 'tensor' but its rows carry different scales"):
        secateur.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_a_quantized_model_with_the_config_s_shapes_records_no_layout(family, tmp_path):
    """The card's layout lists only shapes the config cannot describe. Quantized GPT-2 once recorded
    every Conv1D weight as [out, in] (its shape stand-in was an nn.Linear), as if it were resized."""
    model = tiny_model(family)
    secateur.compress_(model, secateur.RTNConfig(bits=4, group_size=16))
    card = secateur.artifacts.verify(secateur.save(model, tmp_path / family))
    assert card["layout"] is None
