"""Quantized checkpoints in the compressed-tensors format, which stock tools load.

A model whose Linear layers were replaced by :class:`~secateur.runtime.linear.QuantLinear` is saved
the way llm-compressor saves it, so ``transformers.AutoModelForCausalLM.from_pretrained`` (with
``compressed-tensors`` installed) and vLLM read it, and :func:`secateur.load` reads it back into
QuantLinear modules holding the very same integers, without compressed-tensors' runtime. FP8
models (:class:`~secateur.runtime.fp8_linear.FP8Linear`) are saved and read back the same way.

What is written for a quantized module ``<m>`` (``b`` bits, ``[out, in]``, ``G`` scales per row:
1 per channel, ``in / group_size`` per group):

weight-only (W4A16, W8A16, ...), format ``pack-quantized``
    ``<m>.weight_packed``      int32 ``[out, ceil(in * b / 32)]``  the integers, packed by
                               ``compressed_tensors``' ``pack_to_int32`` (offset to unsigned,
                               32 values in ``b`` consecutive words)
    ``<m>.weight_scale``       the scale dtype (float32 here) ``[out, G]``
    ``<m>.weight_shape``       int64 ``[2]``: ``[out, in]``
    ``<m>.weight_zero_point``  asymmetric only: int32 ``[ceil(out * b / 32), G]``, the zero points
                               packed along the output dimension (``packed_dim=0``)

W8A8 (int8 weights, dynamic per-token int8 activations), format ``int-quantized``
    ``<m>.weight``             int8 ``[out, in]``
    ``<m>.weight_scale``       ``[out, 1]``
    ``<m>.weight_zero_point``  asymmetric only: int8 ``[out, 1]``

FP8 (:class:`~secateur.runtime.fp8_linear.FP8Linear`: E4M3 weights, weight-only or with dynamic per-token
FP8 activations), format ``float-quantized``
    ``<m>.weight``             float8_e4m3fn ``[out, in]``
    ``<m>.weight_scale``       float32 ``[out, 1]`` per channel, ``[1]`` per tensor

and ``<m>.bias`` as it is. Symmetric schemes store no zero point (compressed-tensors drops it
too). Integer per-tensor scales are stored per channel (the rows repeat the value; QuantLinear
keeps them that way); FP8 per-tensor scales as the single value compressed-tensors expects.
compressed-tensors' 8-bit float is E4M3 only (``QuantizationArgs.pytorch_dtype``, the
``[-448, 448]`` range of its activation quantization, vLLM's kernels): E5M2 weights are written
in the same layout as float8_e5m2 tensors, which :func:`read` takes back exactly, but stock tools
cannot run them (transformers casts them to E4M3 on load), so the save warns and the card lists
them in ``not_stock_loadable``. ``config.json`` gets a ``quantization_config`` with ``quant_method:
"compressed-tensors"``, ``quantization_status: "compressed"``, one config group per distinct
scheme (each with its ``format``; the top-level ``format`` is that format, or
``"mixed-precision"`` when groups differ), ``targets`` naming the modules (a ``re:`` pattern
when a group holds every layer of a kind, otherwise exact names) and every other Linear in
``ignore`` (vLLM wants each Linear either targeted or ignored).

compressed-tensors is imported only here, and only when a quantized model is saved or loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..errors import SecateurError, one_of

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
INT = "int-quantized"
NAIVE = "naive-quantized"
FLOAT = "float-quantized"
MIXED = "mixed-precision"
READABLE_FORMATS = (PACKED, INT, NAIVE, FLOAT)
FP8_FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
STOCK_FP8 = torch.float8_e4m3fn  # compressed-tensors' (and vLLM's) only 8-bit float
INSTALL_HINT = "pip install 'secateur[quant]'"


# --- the library ---------------------------------------------------------------------------------

def _ct() -> Any:
    """The compressed-tensors package, or a one-line error saying how to install it."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: F401
    except ImportError as exc:
        raise SecateurError(f"saving or loading a quantized model needs the compressed-tensors package "
                            f"({exc.name or exc}); {INSTALL_HINT}") from None
    return compressed_tensors


def _packing() -> tuple[Any, Any]:
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


def _quant_linear_class() -> type:
    from ..runtime.linear import QuantLinear

    return QuantLinear


def _fp8_linear_class() -> type:
    from ..runtime.fp8_linear import FP8Linear

    return FP8Linear


# --- which modules ------------------------------------------------------------------------------

def is_int_quantized(module: nn.Module) -> bool:
    """A QuantLinear (or anything with its interface: integer ``weight_q``, ``weight_scale``, ``bits``)."""
    return isinstance(getattr(module, "weight_q", None), torch.Tensor) and hasattr(module, "bits") \
        and isinstance(getattr(module, "weight_scale", None), torch.Tensor)


def is_fp8(module: nn.Module) -> bool:
    """An FP8Linear (or anything with its interface: float8 ``weight_fp8``, ``weight_scale``)."""
    weight = getattr(module, "weight_fp8", None)
    return isinstance(weight, torch.Tensor) and weight.dtype in FP8_FORMATS \
        and isinstance(getattr(module, "weight_scale", None), torch.Tensor)


def is_quantized(module: nn.Module) -> bool:
    """A module this format writes: a QuantLinear (integers) or an FP8Linear (8-bit floats)."""
    return is_int_quantized(module) or is_fp8(module)


def _stored_weight(module: nn.Module) -> torch.Tensor:
    return module.weight_fp8 if is_fp8(module) else module.weight_q


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and is_quantized(m)}


def has_quantized(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def _is_linear(module: nn.Module) -> bool:
    from ..models.layers import is_projection

    return is_projection(module)


# --- schemes ------------------------------------------------------------------------------------

def _zero_point(module: nn.Module) -> torch.Tensor | None:
    zp = getattr(module, "weight_zero_point", None)
    return zp if isinstance(zp, torch.Tensor) else None


def _symmetric(module: nn.Module) -> bool:
    declared = getattr(module, "symmetric", None)
    if isinstance(declared, bool):
        return declared
    zp = _zero_point(module)
    return zp is None or not bool(zp.any())


def _fp8_strategy(module: nn.Module) -> str:
    """``"tensor"`` or ``"channel"``: the module's own ``strategy``, else ``"tensor"`` when every row
    carries the same scale."""
    declared = getattr(module, "strategy", None)
    scale = module.weight_scale.reshape(-1)
    if declared is None:
        return "tensor" if scale.numel() == 1 or bool((scale == scale[0]).all()) else "channel"
    if declared not in ("tensor", "channel"):
        raise SecateurError(f"FP8 scales per {declared!r} have no compressed-tensors layout here; "
                            "supported: 'tensor', 'channel'")
    if declared == "tensor" and scale.numel() > 1 and not bool((scale == scale[0]).all()):
        raise SecateurError("an FP8 module says strategy 'tensor' but its rows carry different scales")
    return declared


def _fp8_scheme(module: nn.Module) -> dict[str, Any]:
    dtype = module.weight_fp8.dtype
    activation = getattr(module, "activations", None)
    if activation not in (None, "fp8"):
        raise SecateurError(f"FP8 activation quantization {activation!r} has no compressed-tensors layout here; "
                            "supported: None (weight-only) and 'fp8' (dynamic per-token)")
    out_features = module.weight_fp8.shape[0]
    if module.weight_scale.numel() not in (1, out_features):
        raise SecateurError(f"an FP8 weight_scale of shape {tuple(module.weight_scale.shape)} does not fit a "
                            f"[{out_features}, ...] weight (one scale per tensor or per row)")
    return {"bits": 8, "type": "float", "fp8_format": FP8_FORMATS[dtype], "group_size": None,
            "strategy": _fp8_strategy(module), "symmetric": True, "activations": activation, "format": FLOAT}


def scheme_of(module: nn.Module) -> dict[str, Any]:
    """``{"bits", "type", "group_size", "strategy", "symmetric", "activations", "format"}`` of a
    QuantLinear (``type`` ``"int"``) or an FP8Linear (``type`` ``"float"``, plus ``fp8_format``:
    ``"e4m3"`` or ``"e5m2"``)."""
    if is_fp8(module):
        return _fp8_scheme(module)
    bits = int(module.bits)
    group = getattr(module, "group_size", None)
    activation = getattr(module, "activation", None)
    if activation not in (None, "int8"):
        raise SecateurError(f"activation quantization {activation!r} has no compressed-tensors layout here; "
                            "supported: None (weight-only) and 'int8' (dynamic per-token, W8A8)")
    if not 2 <= bits <= 8:
        raise SecateurError(f"{bits}-bit weights have no compressed-tensors layout here; supported: 2..8 bits")
    if activation == "int8" and bits != 8:
        raise SecateurError(f"int8 activations need 8-bit weights (W8A8), got {bits}-bit")
    group = int(group) if group else None
    return {"bits": bits, "type": "int", "group_size": group, "strategy": "group" if group else "channel",
            "symmetric": _symmetric(module), "activations": activation,
            "format": INT if activation == "int8" else PACKED}


def _key(scheme: dict[str, Any]) -> tuple:
    return tuple(scheme.get(k) for k in ("bits", "type", "fp8_format", "group_size", "strategy", "symmetric",
                                         "activations", "format"))


def _weights_args(scheme: dict[str, Any]) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=scheme["bits"], type=scheme["type"], symmetric=scheme["symmetric"],
                            strategy=scheme["strategy"], group_size=scheme["group_size"],
                            dynamic=False).model_dump()


def _input_args(scheme: dict[str, Any]) -> dict[str, Any] | None:
    """Dynamic symmetric per-token activations: int8 (W8A8) or 8-bit float (W8A8-FP8)."""
    kind = {"int8": "int", "fp8": "float"}.get(scheme["activations"])
    if kind is None:
        return None
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True).model_dump()


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _generic(name: str) -> str:
    """The name with its layer indices as ``\\d+``, escaped: ``re:`` pattern of that kind of layer."""
    parts = _INDEX.split(name)
    return r"\d+".join(re.escape(p) for p in parts)


def _targets(names: list[str], linear_names: list[str]) -> list[str]:
    """``re:`` patterns for kinds of layer the group holds entirely (every block's ``q_proj``),
    exact names for the rest."""
    members = set(names)
    by_kind: dict[str, list[str]] = {}
    for n in linear_names:
        by_kind.setdefault(_generic(n), []).append(n)
    out: list[str] = []
    done: set[str] = set()
    for n in names:
        if n in done:
            continue
        kind = _generic(n)
        same = by_kind.get(kind, [n])
        if len(same) > 1 and all(m in members for m in same):
            out.append(f"re:^{kind}$")
            done.update(same)
        else:
            out.append(n)
            done.add(n)
    return out


# --- writing ------------------------------------------------------------------------------------

def _fp8_tensors(module: nn.Module, scheme: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``weight`` (float8 ``[out, in]``), ``weight_scale`` (float32 ``[out, 1]``, or ``[1]`` per
    tensor: the shape compressed-tensors gives the parameter) and ``bias``."""
    weight = module.weight_fp8.detach().cpu().contiguous()
    scale = module.weight_scale.detach().cpu().float().reshape(-1, 1)
    if scheme["strategy"] == "tensor":
        scale = scale[:1].reshape(1)
    else:
        scale = scale.expand(weight.shape[0], 1)
    tensors = {"weight": weight, "weight_scale": scale.contiguous()}
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        tensors["bias"] = bias.detach()
    return tensors


def module_tensors(module: nn.Module, scheme: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one module, local names (``weight_packed``...)."""
    if scheme["type"] == "float":
        return _fp8_tensors(module, scheme)
    pack_to_int32, _ = _packing()
    q = module.weight_q.detach().cpu()
    if q.dtype != torch.int8:
        q = q.to(torch.int8)
    scale = module.weight_scale.detach().cpu()
    out_features, in_features = q.shape
    if scale.dim() == 1:
        scale = scale.reshape(-1, 1)
    if scale.shape[0] == 1 and out_features > 1:  # a per-tensor scale: one per row, as QuantLinear runs it
        scale = scale.expand(out_features, scale.shape[1])
    scale = scale.contiguous()
    groups = in_features // scheme["group_size"] if scheme["group_size"] else 1
    if tuple(scale.shape) != (out_features, groups):
        raise SecateurError(f"weight_scale of shape {tuple(scale.shape)} does not fit a [{out_features}, "
                            f"{in_features}] weight with {groups} scale(s) per row")
    tensors: dict[str, torch.Tensor] = {}
    if scheme["format"] == PACKED:
        tensors["weight_packed"] = pack_to_int32(q.contiguous(), scheme["bits"])
        tensors["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64)
    else:
        tensors["weight"] = q.contiguous()
    tensors["weight_scale"] = scale
    if not scheme["symmetric"]:
        zp = _zero_point(module).detach().cpu().to(torch.int8).reshape(-1, scale.shape[1])
        zp = zp.expand(out_features, groups).contiguous()
        tensors["weight_zero_point"] = pack_to_int32(zp, scheme["bits"], packed_dim=0) \
            if scheme["format"] == PACKED else zp
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        tensors["bias"] = bias.detach()
    return tensors


def check(model: nn.Module) -> None:
    """Raise now what :func:`write` would raise later: compressed-tensors missing, a scheme
    without a layout."""
    _ct()
    for module in quantized_modules(model).values():
        scheme_of(module)


def quantization_config(model: nn.Module, schemes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` that describes the model's QuantLinear/FP8Linear modules; with
    ``schemes`` (module name -> :func:`scheme_of`, recorded while the weights were in memory) the
    modules may be on the meta device. Raises when the model has none."""
    ct = _ct()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    quantized = quantized_modules(model)
    if not quantized:
        raise SecateurError("the model has no quantized (QuantLinear, FP8Linear) modules to write in the "
                            "compressed-tensors format")
    groups: dict[tuple, tuple[dict[str, Any], list[str]]] = {}
    for name, module in quantized.items():
        scheme = schemes[name] if schemes is not None and name in schemes else scheme_of(module)
        groups.setdefault(_key(scheme), (scheme, []))[1].append(name)
    linear_names = [n for n, m in model.named_modules() if n and (_is_linear(m) or is_quantized(m))]
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=_targets(names, linear_names), weights=_weights_args(scheme),
            input_activations=_input_args(scheme), format=scheme["format"]).model_dump()
    formats = {s["format"] for s, _ in groups.values()}
    ignore = [n for n, m in model.named_modules() if n and _is_linear(m) and not is_quantized(m)]
    qconfig = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1 else MIXED,
                                 quantization_status="compressed", ignore=ignore).model_dump()
    # what llm-compressor writes (ModelCompressor.update_config) besides the QuantizationConfig
    qconfig = {"version": ct.__version__, "quant_method": QUANT_METHOD, "sparsity_config": {},
               "transform_config": {}, **qconfig}
    qconfig["quant_method"] = QUANT_METHOD
    return qconfig


def state_and_config(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compressed-tensors tensors of every QuantLinear (full state-dict names) and the
    ``quantization_config`` that describes them. Raises when the model has no QuantLinear."""
    qconfig = quantization_config(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized_modules(model).items():
        tensors.update({f"{name}.{k}": v for k, v in module_tensors(module, scheme_of(module)).items()})
    return tensors, qconfig


def state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The complete state dict to save (dense tensors of the other modules, compressed-tensors
    tensors of the quantized ones) and the quantization config."""
    tensors, qconfig = state_and_config(model)
    prefixes = tuple(f"{name}." for name in quantized_modules(model))
    full = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    full.update(tensors)
    return full, qconfig


@contextmanager
def _quantization_config(model: nn.Module, qconfig: dict[str, Any]) -> Iterator[None]:
    """``model.config.quantization_config`` set to ``qconfig`` for the duration (then restored)."""
    config = model.config
    missing = object()
    previous = config.__dict__.get("quantization_config", missing)
    config.quantization_config = qconfig
    try:
        yield
    finally:
        if previous is missing:
            try:
                del config.quantization_config
            except AttributeError:  # pragma: no cover
                pass
        else:
            config.quantization_config = previous


def write(model: nn.Module, directory: str | os.PathLike, **save_kwargs: Any) -> dict[str, Any]:
    """``model.save_pretrained(directory)`` in the compressed-tensors layout (``state_dict=`` the
    compressed tensors, ``config.quantization_config`` set for the duration of the save only);
    returns the quantization config written to ``config.json``."""
    full, qconfig = state_dict(model)
    reasons = _not_stock_loadable(model)
    not_linear = [n for n, why in reasons.items() if why == NOT_LINEAR]
    e5m2 = [n for n, why in reasons.items() if why == E5M2]
    if not_linear:
        log.warning("%d quantized modules (%s...) are not nn.Linear in %s: stock transformers would load them at "
                    "random (compressed-tensors quantizes nn.Linear only); secateur.load reads them",
                    len(not_linear), not_linear[0], type(model).__name__)
    if e5m2:
        log.warning("%d FP8 modules (%s...) hold E5M2 weights: compressed-tensors' 8-bit float is E4M3, so stock "
                    "transformers and vLLM cannot run them (use format e4m3 for a stock-loadable checkpoint); "
                    "secateur.load reads them", len(e5m2), e5m2[0])
    save_kwargs.setdefault("safe_serialization", True)
    with _quantization_config(model, qconfig):
        model.save_pretrained(directory, state_dict=full, **save_kwargs)
    written = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    if not isinstance(written, dict) or written.get("quant_method") != QUANT_METHOD:
        raise SecateurError(f"save_pretrained did not write the compressed-tensors quantization_config to "
                            f"{directory}/config.json")
    return written


NOT_LINEAR = "not nn.Linear in the model class"
E5M2 = "E5M2 weights (compressed-tensors' 8-bit float is E4M3)"


def _not_stock_loadable(model: nn.Module) -> dict[str, str]:
    """Module name -> why stock transformers cannot load it (:data:`NOT_LINEAR`, :data:`E5M2`)."""
    quantized = quantized_modules(model)
    out = {name: E5M2 for name, m in quantized.items() if is_fp8(m) and m.weight_fp8.dtype != STOCK_FP8}
    if not quantized or not hasattr(model, "config"):
        return out
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
    except Exception as exc:  # pragma: no cover - the check must never stop a save
        log.debug("could not build %s on the meta device: %s", type(model).__name__, exc)
        return out
    for name in quantized:
        try:
            built = fresh.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(built, nn.Linear):
            out[name] = NOT_LINEAR
    return {name: out[name] for name in quantized if name in out}


def not_stock_loadable(model: nn.Module) -> list[str]:
    """Quantized modules that stock transformers cannot load: compressed-tensors quantizes only
    ``nn.Linear`` (and Embedding) modules, so where the model class builds something else (GPT-2's
    ``Conv1D``) it leaves the module dense and initialises its weight at random, with only a
    warning; and its 8-bit float is E4M3, so E5M2 FP8 weights do not run (transformers casts
    them to E4M3 on load: wrong values, clipped at 448). :func:`read` loads them all."""
    return list(_not_stock_loadable(model))


def layer_totals(layers: dict[str, Any]) -> dict[str, Any]:
    """The card's ``quantization`` entry over per-layer records (:func:`describe`'s ``layers``,
    or the records a streamed run kept block by block): counts by bit width, bytes, ratio."""
    bits_count: dict[str, int] = {}
    for layer in layers.values():
        bits_count[str(layer["bits"])] = bits_count.get(str(layer["bits"]), 0) + 1
    stored = sum(layer["bytes"] for layer in layers.values())
    dense = sum(layer["dense_bytes"] for layer in layers.values())
    formats = {layer["format"] for layer in layers.values()}
    return {"format": QUANT_METHOD,
            "compression_format": (formats.pop() if len(formats) == 1 else MIXED) if formats else None,
            "modules": len(layers), "bits": dict(sorted(bits_count.items())),
            "quantized_bytes": stored, "quantized_dense_bytes": dense,
            "quantized_ratio": round(stored / dense, 6) if dense else None, "layers": layers}


def describe(model: nn.Module, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The card's ``quantization`` entry: the scheme and stored bytes of every quantized layer,
    totals, and (given the artifact ``directory``) the bytes of its weight files on disk."""
    quantized = quantized_modules(model)
    layers: dict[str, Any] = {}
    dtype = getattr(model, "dtype", torch.float32)
    width = torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    for name, module in quantized.items():
        scheme = scheme_of(module)
        out_features, in_features = _stored_weight(module).shape
        groups = in_features // scheme["group_size"] if scheme["group_size"] else 1
        scale_bytes = out_features * groups * module.weight_scale.element_size()
        if scheme["type"] == "float":  # one byte a weight, float32 scales: one per row or one in all
            weight_bytes, zp_bytes = out_features * in_features, 0
            scale_bytes = (1 if scheme["strategy"] == "tensor" else out_features) * 4
        elif scheme["format"] == PACKED:
            weight_bytes = out_features * math.ceil(in_features * scheme["bits"] / 32) * 4 + 2 * 8
            zp_bytes = math.ceil(out_features * scheme["bits"] / 32) * groups * 4
        else:
            weight_bytes, zp_bytes = out_features * in_features, out_features * groups
        bias = getattr(module, "bias", None)
        bias_bytes = bias.numel() * bias.element_size() if isinstance(bias, torch.Tensor) else 0
        nbytes = weight_bytes + scale_bytes + (0 if scheme["symmetric"] else zp_bytes) + bias_bytes
        dense_bytes = (out_features * in_features + (bias.numel() if bias_bytes else 0)) * width
        layers[name] = {**scheme, "shape": [out_features, in_features], "bytes": nbytes, "dense_bytes": dense_bytes,
                        "bits_per_weight": round(8 * (nbytes - bias_bytes) / (out_features * in_features), 4)}
    entry = layer_totals(layers)
    if directory is not None:
        files = sorted(Path(directory).glob("*.safetensors"))
        entry["weights_bytes"] = sum(p.stat().st_size for p in files)
    reasons = _not_stock_loadable(model)
    entry["stock_transformers"] = not reasons
    if reasons:
        entry["not_stock_loadable"] = list(reasons)
        entry["not_stock_loadable_reasons"] = sorted(set(reasons.values()))
    return entry


@contextmanager
def dense_view(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every QuantLinear temporarily swapped for an empty projection of its shape, of
    the class the family's config builds (``nn.Linear``, GPT-2's Conv1D), on the meta device (no
    memory), for code that reads shapes from the weights."""
    from ..models.layers import projection_like

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module in quantized_modules(model).items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            out_features, in_features = _stored_weight(module).shape
            bias = isinstance(getattr(module, "bias", None), torch.Tensor)
            stand_in = projection_like(model, in_features, out_features, bias)
            setattr(parent, child, stand_in)
            swapped.append((parent, child, module))
        yield model
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


# --- reading ------------------------------------------------------------------------------------

def quantization_config_of(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``directory/config.json`` when it is compressed-tensors', else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == QUANT_METHOD:
        return qconfig
    return None


def _supported() -> str:
    return (f"secateur reads compressed-tensors checkpoints with integer weights of 2-8 bits per channel, group "
            f"or tensor, or 8-bit float (FP8) weights per channel or tensor, stored as {one_of(READABLE_FORMATS)} "
            f"(or {MIXED!r} of those), weight-only or with dynamic per-token activations of the weights' type "
            "(int8, FP8), quantization_status 'compressed'")


def _unsupported(where: str, what: str) -> SecateurError:
    return SecateurError(f"{where}: {what}; {_supported()}")


def parse(qconfig: dict[str, Any], where: str = "quantization_config") -> Any:
    """The compressed-tensors QuantizationConfig of ``qconfig``, checked to be one secateur reads."""
    _ct()
    from compressed_tensors.quantization import QuantizationConfig

    top = qconfig.get("format")
    if top is not None and top not in READABLE_FORMATS + (MIXED,):
        raise _unsupported(where, f"format {top!r} is not supported")
    status = qconfig.get("quantization_status")
    if status != "compressed":
        raise _unsupported(where, f"quantization_status {status!r} is not supported")
    for key in ("sparsity_config", "transform_config"):
        if qconfig.get(key):
            raise _unsupported(where, f"a {key} is not supported")
    try:
        parsed = QuantizationConfig.model_validate({k: v for k, v in qconfig.items() if k not in ("version",)})
    except Exception as exc:  # pydantic's ValidationError and the library's own ValueErrors
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3]) if first else type(exc).__name__
        raise _unsupported(where, f"it is not a valid compressed-tensors config ({detail})") from None
    if parsed.kv_cache_scheme is not None:
        raise _unsupported(where, "kv_cache_scheme is not supported")
    if not parsed.config_groups:
        raise _unsupported(where, "it has no config_groups")
    for group_name, scheme in parsed.config_groups.items():
        here = f"{where}.config_groups.{group_name}"
        fmt = scheme.format or top
        if fmt not in READABLE_FORMATS:
            raise _unsupported(here, f"format {fmt!r} is not supported")
        w = scheme.weights
        integer = w is not None and w.type == "int" and 2 <= w.num_bits <= 8 \
            and w.strategy in ("channel", "group", "tensor")
        fp8 = w is not None and w.type == "float" and w.num_bits == 8 and w.strategy in ("channel", "tensor") \
            and w.symmetric and fmt in (FLOAT, NAIVE)
        if not (integer or fp8) or w.dynamic:
            raise _unsupported(here, "its weights are not supported (" + (
                "none" if w is None else f"{w.type} {w.num_bits}-bit, strategy {w.strategy}"
                + ("" if w.symmetric else ", asymmetric") + (", dynamic" if w.dynamic else "")
                + (f", format {fmt!r}" if w.type == "float" else "")) + ")")
        if fmt != PACKED and w.num_bits != 8:
            raise _unsupported(here, f"{w.num_bits}-bit weights in format {fmt!r} are not supported")
        if integer and fmt == FLOAT:
            raise _unsupported(here, f"integer weights in format {fmt!r} are not supported")
        a = scheme.input_activations
        if a is not None and not (a.type == w.type and a.num_bits == 8 and a.symmetric and a.dynamic is True
                                  and a.strategy == "token"):
            raise _unsupported(here, f"input activations {a.type} {a.num_bits}-bit strategy {a.strategy} "
                                     f"(dynamic {a.dynamic}) are not supported with {w.type} weights")
        if a is not None and w.num_bits != 8:
            raise _unsupported(here, "int8 activations with weights that are not 8-bit are not supported")
        if scheme.output_activations is not None:
            raise _unsupported(here, "output activation quantization is not supported")
    return parsed


def _assign(model: nn.Module, parsed: Any, where: str) -> dict[str, Any]:
    """Module name -> its scheme, with compressed-tensors' own target/ignore matching."""
    from compressed_tensors.utils.match import is_match

    ignore = parsed.ignore or []
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not name or not _is_linear(module):
            continue
        if ignore and is_match(name, module, ignore):
            continue
        found = [s for s in parsed.config_groups.values() if is_match(name, module, s.targets)]
        if not found:
            continue
        if any(s.model_dump(exclude={"targets"}) != found[0].model_dump(exclude={"targets"}) for s in found[1:]):
            raise SecateurError(f"{where}: module '{name}' matches several config groups with different schemes; "
                                "make the targets disjoint")
        out[name] = found[0]
    return out


@contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    previous = torch.get_default_dtype()
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fp8_module_from(name: str, scheme: Any, local: dict[str, torch.Tensor], where: str) -> nn.Module:
    """An FP8Linear from the ``weight`` (float8) and ``weight_scale`` of module ``name``."""
    try:
        weight, scale = local["weight"], local["weight_scale"]
    except KeyError as exc:
        raise SecateurError(f"{where}: module '{name}' lacks its {exc.args[0]} tensor; "
                            "re-create the checkpoint") from None
    if weight.dtype not in FP8_FORMATS or weight.dim() != 2:
        raise SecateurError(f"{where}: module '{name}' stores {weight.dtype} weights of shape {tuple(weight.shape)}; "
                            "expected float8_e4m3fn (or float8_e5m2) [out, in]")
    out_features = weight.shape[0]
    strategy = str(getattr(scheme.weights.strategy, "value", scheme.weights.strategy))
    expected = 1 if strategy == "tensor" else out_features
    if not scale.is_floating_point() or scale.numel() != expected or (strategy == "channel" and scale.dim() == 2
                                                                      and scale.shape[1] != 1):
        raise SecateurError(f"{where}: module '{name}' has weight_scale of shape {tuple(scale.shape)}, expected "
                            f"{(1,) if strategy == 'tensor' else (out_features, 1)}")
    scale = scale.float().reshape(-1, 1).expand(out_features, 1).contiguous()
    activations = "fp8" if scheme.input_activations is not None else None
    return _fp8_linear_class()(weight.contiguous(), scale, local.get("bias"), activations, strategy)


def _module_from(name: str, scheme: Any, top_format: str, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A QuantLinear (FP8Linear for float weights) from the compressed-tensors tensors of module
    ``name`` (popped from ``state``)."""
    _, unpack_from_int32 = _packing()
    w = scheme.weights
    fmt = scheme.format or top_format
    bits = int(w.num_bits)
    local = {k[len(name) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(f"{name}.")
                                                        and "." not in k[len(name) + 1:]]}
    if w.type == "float":
        return _fp8_module_from(name, scheme, local, where)
    try:
        scale = local["weight_scale"]
        if fmt == PACKED:
            shape = [int(n) for n in local["weight_shape"].tolist()]
            q = unpack_from_int32(local["weight_packed"], bits, torch.Size(shape))
        else:
            q = local["weight"]
            shape = list(q.shape)
    except KeyError as exc:
        raise SecateurError(f"{where}: module '{name}' lacks its {exc.args[0]} tensor; "
                            "re-create the checkpoint") from None
    except (ValueError, RuntimeError) as exc:  # the library's unpacking: wrong dtype or shape
        raise SecateurError(f"{where}: module '{name}' has packed weights that do not unpack ({_first_line(exc)}); "
                            "re-create the checkpoint") from None
    if q.dtype != torch.int8 or len(shape) != 2:
        raise SecateurError(f"{where}: module '{name}' stores {q.dtype} weights of shape {tuple(q.shape)}; "
                            "expected int8 [out, in]")
    out_features, in_features = shape
    group = int(w.group_size) if w.strategy == "group" else None
    if scale.dim() == 1:
        scale = scale.reshape(-1, 1)
    if w.strategy == "tensor":
        scale = scale.reshape(1, 1).expand(out_features, 1).contiguous()
    groups = in_features // group if group else 1
    if group and in_features % group:
        raise SecateurError(f"{where}: module '{name}' has {in_features} input columns, not a multiple of its "
                            f"group_size {group}")
    if tuple(scale.shape) != (out_features, groups):
        raise SecateurError(f"{where}: module '{name}' has weight_scale of shape {tuple(scale.shape)}, expected "
                            f"{(out_features, groups)}")
    if w.symmetric:
        zero = torch.zeros(out_features, groups, dtype=torch.int8)
    else:
        zp = local.get("weight_zero_point")
        if zp is None:
            raise SecateurError(f"{where}: module '{name}' is asymmetric but stores no weight_zero_point")
        if fmt == PACKED and w.strategy in ("group", "channel"):
            try:
                zero = unpack_from_int32(zp, bits, torch.Size([out_features, groups]), packed_dim=0)
            except (ValueError, RuntimeError) as exc:
                raise SecateurError(f"{where}: module '{name}' has a packed weight_zero_point that does not unpack "
                                    f"({_first_line(exc)}); re-create the checkpoint") from None
        else:
            zero = zp.to(torch.int8).reshape(-1, 1) if w.strategy == "tensor" else zp.to(torch.int8)
        if w.strategy == "tensor":
            zero = zero.reshape(1, 1).expand(out_features, 1)
        zero = zero.reshape(out_features, groups).contiguous()
    activation = "int8" if scheme.input_activations is not None else None
    bias = local.get("bias")
    return _quant_linear_class().from_quantized(q.contiguous(), scale.contiguous(), zero, bits, group, bias, activation)


def read(model_class: Any, directory: str | os.PathLike, config: Any, dtype: Any = None, *,
         state: dict[str, torch.Tensor] | None = None, layout: dict[str, Any] | None = None) -> nn.Module:
    """Build ``model_class`` with QuantLinear (and FP8Linear) modules from the compressed-tensors checkpoint at
    ``directory`` (``config`` its config, with the ``quantization_config``), without
    transformers' quantizer. ``state`` is the checkpoint's tensors when already read (sparse
    storage decoded), ``layout`` the per-module shapes a secateur card recorded."""
    import copy

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    where = f"{directory}/config.json quantization_config"
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict() if hasattr(qconfig, "to_dict") else quantization_config_of(directory)
    if not isinstance(qconfig, dict):
        raise SecateurError(f"{directory}: config.json has no compressed-tensors quantization_config")
    parsed = parse(qconfig, where)
    if state is None:
        from .bitmask import read_dense

        state = read_dense(directory)
    state = dict(state)
    config = copy.deepcopy(config)
    if "quantization_config" in config.__dict__:
        del config.quantization_config
    with no_init_weights(), _default_dtype(dtype):  # every tensor is loaded below: skip random init
        model = model_class(config)
    if layout:
        from ..models.structure import apply_layout

        apply_layout(model, layout)
    assigned = _assign(model, parsed, where)
    if not assigned:
        raise SecateurError(f"{where}: no Linear module of the model matches the config groups' targets")
    for name, scheme in assigned.items():
        module = _module_from(name, scheme, parsed.format, state, where)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    prefixes = tuple(f"{name}." for name in assigned)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(prefixes)]
    tied = {k for k in missing if k.endswith("lm_head.weight")
            and getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise SecateurError(f"{where}: the checkpoint does not match the model (missing "
                            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}); re-create it")
    if tied:
        model.tie_weights()
    return model.eval()


__all__ = ["QUANT_METHOD", "READABLE_FORMATS", "state_and_config", "state_dict", "write", "read", "describe",
           "parse", "quantization_config_of", "is_quantized", "is_int_quantized", "is_fp8", "quantized_modules",
           "has_quantized", "scheme_of", "dense_view", "not_stock_loadable", "check"]
