"""ONNX export: ``secateur export ARTIFACT OUT --format onnx`` writes ``OUT/model.onnx`` for ONNX Runtime.

The graph is written node by node from the architecture table's row and the loaded modules — not
traced — so a quantized layer becomes exactly the operators that hold *our* integers and scales,
and the cache inputs and outputs have the names and axes a decoder loop expects. Two kinds of model:

**Encoders** (``bert``, ``roberta``): inputs ``input_ids``, ``attention_mask`` ``[batch, seq]``
(and ``token_type_ids`` when the model has a token-type embedding); outputs ``last_hidden_state``
``[batch, seq, hidden]`` and ``sentence_embedding`` ``[batch, hidden]``: the mean of
``last_hidden_state`` over the non-padding tokens, L2-normalised — what secateur's STS evaluation
(P2, :func:`secateur.evaluate.sts.sentence_embeddings`) computes, so a user gets embeddings straight
from ONNX Runtime.

**Causal LMs** (``llama``, ``mistral``, ``qwen2``): inputs ``input_ids`` and ``position_ids``
``[batch, seq]``, ``attention_mask`` ``[batch, past + seq]`` (1 for a real token), and for each
block ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, past, head_dim]`` (``past`` may
be 0); outputs ``logits`` ``[batch, seq, vocab]`` and ``present.{i}.key`` / ``.value`` (the past
with this call's keys and values appended). Rotary embeddings are computed in the graph from the
model's own ``inv_freq`` and ``attention_scaling``; the mask is causal over ``past + seq``
(sliding-window where the model's layers use it), padding from ``attention_mask``.
:func:`secateur.runtime.ort_session.greedy_decode` runs one step at a time.

**What a linear layer becomes** (weights stored ``[in, out]`` so ONNX Runtime's MatMul reads them
as they are):

* a float ``Linear``: a float32 initializer and ``MatMul`` (+ bias). Pruned artifacts, whatever
  their storage, are loaded dense and exported dense.
* a weight-only :class:`~secateur.runtime.linear.QuantLinear` (W8A16, W4A16, ...): QDQ —
  ``DequantizeLinear`` of the integer initializer (INT8 for 5-8 bits, INT4 for 2-4 bits: our
  integers, transposed, never re-rounded) with our scales (float32) and zero points (omitted when
  symmetric), per output channel (``axis=1``) or blocked per group of input columns
  (``axis=0``, ``block_size=group_size``, opset 21), then ``MatMul``. ``(q - zero_point) * scale`` is
  exactly secateur's dequantized weight.
* a W8A8 QuantLinear (dynamic per-token symmetric int8 activations): the activation is quantized
  in the graph exactly as :func:`secateur.runtime.kernels.quantize_per_token` does (``scale =
  max(max|x_row| / 127, 1e-12)``, ``round`` half to even), then ``MatMulInteger`` of those
  integers (handed over as ``uint8`` ``q + 128`` with activation zero point 128: ONNX Runtime's fast
  integer GEMM takes unsigned activations, and the products are the same) with our int8 weight
  initializer (our zero point as its ``b_zero_point`` when asymmetric), the int32 result rescaled by the token's scale and our per-channel scale, plus
  the bias: the same integer products as secateur's kernels, no re-calibration.

Nothing is requantized; an FP8 layer, or a layer type the writer does not know, is a one-line error.

Beside ``model.onnx`` the export writes ``onnx_export.json`` (what was exported, from which artifact and
weights hash, the opset, inputs and outputs, each quantized layer's mapping, and the verification:
ONNX Runtime against secateur's own model on a fixed input, the largest difference and the
tolerance it met) and the tokenizer files. Tolerances (relative to the largest reference value,
compared with secateur's reference path, :func:`~secateur.runtime.linear.reference_only`):
``1e-4`` for float and weight-only graphs (the same float math in another order), ``5e-2`` for
W8A8 (a value on an int8 rounding boundary may round one step the other way after float
reordering and the flip spreads through attention; the integer products themselves are exact, and
secateur's own int8 kernels differ from its reference path by as much). Causal exports also check that greedy
tokens through the cache equal secateur's.

The file is written into a hidden sibling folder and renamed into place; an existing earlier
export at ``OUT`` is replaced, anything else there is refused. Models over 1.5 GiB keep their
initializers in ``model.onnx.data`` (ONNX's external data). ``onnx`` is imported only here;
``onnxruntime`` only for the verification.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import SecateurError, one_of

log = logging.getLogger(__name__)

OPSET = 21
MODEL_NAME, CARD = "model.onnx", "onnx_export.json"
ENCODERS = ("bert", "roberta")
CAUSAL = ("llama", "mistral", "qwen2")
TOLERANCE = {"float": 1e-4, "w8a8": 5e-2}
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB: below protobuf's 2 GiB limit with room for the graph
INSTALL_HINT = "pip install 'secateur[onnx]'"
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise SecateurError(f"ONNX export needs the onnx package; {INSTALL_HINT}") from None
    return onnx


# --- a small graph writer -----------------------------------------------------------------------

class _Graph:
    """Nodes and initializers in the order they are added; every value gets a fresh name."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: set[str] = set()
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, kind: str, *inputs: str, out: str | None = None, hint: str | None = None, **attrs: Any) -> str:
        out = out or self.fresh(hint or kind)
        self.nodes.append(self.onnx.helper.make_node(kind, list(inputs), [out], name=out, **attrs))
        return out

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self.names:
            raise SecateurError(f"onnx export: two initializers named '{name}'")
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def int4(self, name: str, values: np.ndarray) -> str:
        """An INT4 initializer holding ``values`` (integers in [-8, 7]), packed two to a byte, low nibble first."""
        flat = values.astype(np.int8).reshape(-1)
        nibbles = (flat & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        self.names.add(name)
        self.inits.append(self.onnx.helper.make_tensor(name, self.onnx.TensorProto.INT4, list(values.shape),
                                                       packed.tobytes(), raw=True))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A (shared) constant initializer: a scalar or a small list."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.fresh("const"), array)
        return self._consts[key]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# --- linear layers ------------------------------------------------------------------------------

def _is_quant(module: Any) -> bool:
    return isinstance(getattr(module, "weight_q", None), torch.Tensor) and hasattr(module, "bits")


def _bias(g: _Graph, y: str, module: Any, name: str) -> str:
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        y = g.op("Add", y, g.init(f"{name}.bias", _np(bias.float())), hint=f"{name}.out")
    return y


def _per_token_int8(g: _Graph, x: str, name: str) -> tuple[str, str]:
    """``(x's integers + 128 as uint8, the per-row scale)``: the integers and scales of
    :func:`secateur.runtime.kernels.quantize_per_token`, offset by 128 (given back to
    ``MatMulInteger`` as the activation zero point) because ONNX Runtime's fast integer GEMM takes
    unsigned activations; the products are the same integers."""
    peak = g.op("ReduceMax", g.op("Abs", x), g.const([-1], np.int64), keepdims=1)
    scale = g.op("Max", g.op("Div", peak, g.const(127.0)), g.const(1e-12), hint=f"{name}.x_scale")
    shifted = g.op("Add", g.op("Round", g.op("Div", x, scale)), g.const(128.0))
    return g.op("Cast", shifted, to=g.onnx.TensorProto.UINT8, hint=f"{name}.x_q"), scale


def linear(g: _Graph, x: str, module: Any, name: str, record: dict[str, Any]) -> str:
    """The output of module ``name`` (a float Linear or a QuantLinear) applied to ``x``; quantized
    layers are described in ``record["quantization"]``."""
    if isinstance(getattr(module, "weight_fp8", None), torch.Tensor):
        raise SecateurError(f"onnx export: layer '{name}' holds FP8 weights, which this export does not write; "
                            "export a float or integer-quantized variant")
    if not _is_quant(module):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or type(module).__name__ != "Linear":
            raise SecateurError(f"onnx export: layer '{name}' is a {type(module).__name__}, which this export does "
                                "not write (it writes torch Linear and secateur QuantLinear layers)")
        w = g.init(f"{name}.weight", _np(weight.float()).T)
        return _bias(g, g.op("MatMul", x, w, hint=f"{name}.mm"), module, name)

    bits, group = int(module.bits), getattr(module, "group_size", None)
    q = _np(module.weight_q).T  # [in, out]: our integers, transposed, never re-rounded
    scale = _np(module.weight_scale.float()).T  # [G, out]
    zero = _np(module.weight_zero_point).T
    symmetric = not bool(module.weight_zero_point.ne(0).any())
    entry = {"bits": bits, "group_size": group, "symmetric": symmetric,
             "activations": getattr(module, "activation", None)}
    if getattr(module, "activation", None) == "int8":
        weight = g.init(f"{name}.weight_q", q.astype(np.int8))
        xq, xs = _per_token_int8(g, x, name)
        inputs = [xq, weight, g.const(128, np.uint8)]
        if not symmetric:
            inputs.append(g.init(f"{name}.weight_zero_point", zero.reshape(-1)))
        acc = g.op("MatMulInteger", *inputs, hint=f"{name}.acc")
        y = g.op("Mul", g.op("Cast", acc, to=g.onnx.TensorProto.FLOAT), xs)
        y = g.op("Mul", y, g.init(f"{name}.weight_scale", scale.reshape(-1)), hint=f"{name}.mm")
        entry["onnx"] = ("per-token int8 activations (max|x|/127, round half to even; passed as uint8 + 128 with "
                         "zero point 128) x int8 weight_q by MatMulInteger, rescaled by both scales")
        entry["initializers"] = {"weight_q": f"{name}.weight_q"}
    else:
        store = "INT4" if bits <= 4 else "INT8"
        weight = g.int4(f"{name}.weight_q", q) if store == "INT4" else g.init(f"{name}.weight_q", q.astype(np.int8))
        attrs: dict[str, Any] = {"axis": 0, "block_size": int(group)} if group else {"axis": 1}
        s = g.init(f"{name}.weight_scale", scale if group else scale.reshape(-1))
        inputs = [weight, s]
        if not symmetric:
            zp = zero if group else zero.reshape(-1)
            inputs.append(g.int4(f"{name}.weight_zero_point", zp) if store == "INT4"
                          else g.init(f"{name}.weight_zero_point", zp.astype(np.int8)))
        w = g.op("DequantizeLinear", *inputs, hint=f"{name}.weight", **attrs)
        y = g.op("MatMul", x, w, hint=f"{name}.mm")
        entry["onnx"] = (f"DequantizeLinear({store} weight_q [in, out], float32 scale"
                         + ("" if symmetric else ", zero point") + (f", blocks of {group} along in" if group
                                                                     else ", per output channel") + ") -> MatMul")
        entry["initializers"] = {"weight_q": f"{name}.weight_q", "type": store}
    record["quantization"][name] = entry
    return _bias(g, y, module, name)


# --- shared pieces ------------------------------------------------------------------------------

def _split_heads(g: _Graph, x: str, heads: int, head_dim: int) -> str:
    """``[B, S, heads * head_dim]`` -> ``[B, heads, S, head_dim]``."""
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, heads, head_dim], np.int64)), perm=[0, 2, 1, 3])


def _merge_heads(g: _Graph, x: str) -> str:
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, -1], np.int64))


def _attend(g: _Graph, q: str, k: str, v: str, bias: str, scaling: float) -> str:
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(scaling))
    probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    return g.op("MatMul", probs, v)


def _activation(g: _Graph, x: str, kind: str) -> str:
    if kind == "gelu":  # exact: x/2 (1 + erf(x / sqrt 2))
        inner = g.op("Erf", g.op("Div", x, g.const(float(np.sqrt(2.0)))))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", inner, g.const(1.0)))
    if kind in ("gelu_new", "gelu_pytorch_tanh"):
        cube = g.op("Mul", g.op("Pow", x, g.const(3.0)), g.const(0.044715))
        inner = g.op("Tanh", g.op("Mul", g.op("Add", x, cube), g.const(float(np.sqrt(2.0 / np.pi)))))
        return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", inner, g.const(1.0)))
    if kind == "relu":
        return g.op("Relu", x)
    return g.op("Mul", x, g.op("Sigmoid", x))  # silu / swish


def _check_activation(config: Any, attr: str) -> str:
    kind = getattr(config, attr, None)
    if kind not in _ACTIVATIONS:
        raise SecateurError(f"onnx export: activation {kind!r} is not written; supported: {one_of(_ACTIVATIONS)}")
    return kind


def _tensor_info(g: _Graph, name: str, elem: int, shape: list[Any]) -> Any:
    return g.onnx.helper.make_tensor_value_info(name, elem, shape)


# --- encoders -----------------------------------------------------------------------------------

def _encoder(g: _Graph, model: Any, record: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    T = g.onnx.TensorProto
    config = model.config
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise SecateurError(f"onnx export: position_embedding_type {config.position_embedding_type!r} is not "
                            "written; supported: 'absolute'")
    act = _check_activation(config, "hidden_act")
    base = getattr(model, "base_model", model)
    emb = base.embeddings
    inputs = [_tensor_info(g, "input_ids", T.INT64, ["batch", "sequence"]),
              _tensor_info(g, "attention_mask", T.INT64, ["batch", "sequence"])]
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    at = (lambda n: f"{prefix}.{n}" if prefix else n)  # noqa: E731

    x = g.op("Gather", g.init(at("embeddings.word_embeddings.weight"), _np(emb.word_embeddings.weight.float())),
             "input_ids")
    if config.model_type == "roberta":  # positions count the non-padding tokens, after padding_idx
        pad = int(emb.padding_idx)
        real = g.op("Cast", g.op("Not", g.op("Equal", "input_ids", g.const(pad, np.int64))), to=T.INT64)
        positions = g.op("Add", g.op("Mul", g.op("CumSum", real, g.const(1, np.int64)), real), g.const(pad, np.int64))
    else:
        seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2))
        positions = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), seq, g.const(1, np.int64)),
                         g.const([0], np.int64))
    table = g.init(at("embeddings.position_embeddings.weight"), _np(emb.position_embeddings.weight.float()))
    x = g.op("Add", x, g.op("Gather", table, positions))
    types = getattr(emb, "token_type_embeddings", None)
    if types is not None:
        inputs.append(_tensor_info(g, "token_type_ids", T.INT64, ["batch", "sequence"]))
        x = g.op("Add", x, g.op("Gather", g.init(at("embeddings.token_type_embeddings.weight"),
                                                 _np(types.weight.float())), "token_type_ids"))

    def layer_norm(x: str, norm: Any, name: str) -> str:
        return g.op("LayerNormalization", x, g.init(f"{name}.weight", _np(norm.weight.float())),
                    g.init(f"{name}.bias", _np(norm.bias.float())), axis=-1, epsilon=float(norm.eps), hint=name)

    x = layer_norm(x, emb.LayerNorm, at("embeddings.LayerNorm"))
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2], np.int64)), to=T.BOOL)
    bias = g.op("Where", keep, g.const(0.0), g.const(float(np.finfo(np.float32).min)), hint="attention_bias")
    for i, block in enumerate(base.encoder.layer):
        name = at(f"encoder.layer.{i}")
        attn = block.attention.self
        heads, head_dim = int(attn.num_attention_heads), int(attn.attention_head_size)
        q, k, v = (_split_heads(g, linear(g, x, getattr(attn, role), f"{name}.attention.self.{role}", record),
                                heads, head_dim) for role in ("query", "key", "value"))
        context = _merge_heads(g, _attend(g, q, k, v, bias, float(head_dim) ** -0.5))
        out = linear(g, context, block.attention.output.dense, f"{name}.attention.output.dense", record)
        x = layer_norm(g.op("Add", out, x), block.attention.output.LayerNorm, f"{name}.attention.output.LayerNorm")
        up = _activation(g, linear(g, x, block.intermediate.dense, f"{name}.intermediate.dense", record), act)
        down = linear(g, up, block.output.dense, f"{name}.output.dense", record)
        x = layer_norm(g.op("Add", down, x), block.output.LayerNorm, f"{name}.output.LayerNorm")
    g.op("Identity", x, out="last_hidden_state")
    # the sentence embedding of secateur's STS evaluation: mean over real tokens, L2-normalised
    weights = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([-1], np.int64)), to=T.FLOAT)
    total = g.op("ReduceSum", g.op("Mul", x, weights), g.const([1], np.int64), keepdims=0)
    count = g.op("Max", g.op("ReduceSum", weights, g.const([1], np.int64), keepdims=0), g.const(1.0))
    pooled = g.op("Div", total, count)
    norm = g.op("Sqrt", g.op("ReduceSum", g.op("Mul", pooled, pooled), g.const([-1], np.int64), keepdims=1))
    g.op("Div", pooled, g.op("Max", norm, g.const(1e-12)), out="sentence_embedding")
    if getattr(base, "pooler", None) is not None:
        record["not_exported"] = ["pooler (the sentence embedding is mean-pooled, as secateur's STS evaluation does)"]
    hidden = int(config.hidden_size)
    outputs = [_tensor_info(g, "last_hidden_state", T.FLOAT, ["batch", "sequence", hidden]),
               _tensor_info(g, "sentence_embedding", T.FLOAT, ["batch", hidden])]
    return inputs, outputs


# --- causal LMs ---------------------------------------------------------------------------------

def _sliding_windows(config: Any) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    layers = int(config.num_hidden_layers)
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return [int(window) if kind == "sliding_attention" and window else None for kind in kinds]
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return [None] * layers
    return [int(window) if window else None] * layers


def _rms_norm(g: _Graph, x: str, norm: Any, name: str) -> str:
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    mean = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1], np.int64), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.const(eps))))
    return g.op("Mul", g.init(f"{name}.weight", _np(norm.weight.float())), g.op("Mul", x, inv), hint=name)


def _rotate(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    first = g.op("Slice", x, g.const([0], np.int64), g.const([half], np.int64), g.const([-1], np.int64))
    second = g.op("Slice", x, g.const([half], np.int64), g.const([2 * half], np.int64), g.const([-1], np.int64))
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _causal(g: _Graph, model: Any, record: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    T = g.onnx.TensorProto
    config = model.config
    _check_activation(config, "hidden_act")
    base = model.model
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    rotary = base.rotary_emb
    inv_freq = _np(rotary.inv_freq.float())
    if 2 * inv_freq.size != head_dim:
        raise SecateurError(f"onnx export: partial rotary embeddings ({2 * inv_freq.size} of {head_dim} dimensions) "
                            "are not written")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    layers = base.layers
    inputs = [_tensor_info(g, "input_ids", T.INT64, ["batch", "sequence"]),
              _tensor_info(g, "attention_mask", T.INT64, ["batch", "total_sequence"]),
              _tensor_info(g, "position_ids", T.INT64, ["batch", "sequence"])]
    outputs = [_tensor_info(g, "logits", T.FLOAT, ["batch", "sequence", int(config.vocab_size)])]
    kv_heads = []
    for i, block in enumerate(layers):
        kv = block.self_attn.k_proj
        n = (kv.out_features if hasattr(kv, "out_features") else kv.weight.shape[0]) // head_dim
        kv_heads.append(n)
        for part in ("key", "value"):
            inputs.append(_tensor_info(g, f"past_key_values.{i}.{part}", T.FLOAT, ["batch", n, "past_sequence", head_dim]))
            outputs.append(_tensor_info(g, f"present.{i}.{part}", T.FLOAT,
                                        ["batch", n, "total_sequence", head_dim]))

    # rotary tables [B, 1, S, head_dim] from the positions
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", "position_ids", to=T.FLOAT), g.const([-1], np.int64)),
                  g.init("rotary.inv_freq", inv_freq))
    angles = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.const([1], np.int64))
    cos, sin = g.op("Cos", angles), g.op("Sin", angles)
    if scaling != 1.0:
        cos, sin = g.op("Mul", cos, g.const(scaling)), g.op("Mul", sin, g.const(scaling))

    # the mask [B, 1, S, past + S]: query i (at past + i) sees key j <= past + i that is not padding
    one, zero = g.const(1, np.int64), g.const(0, np.int64)
    past = g.op("Squeeze", g.op("Shape", "past_key_values.0.key", start=2, end=3))
    seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2))
    q_pos = g.op("Unsqueeze", g.op("Add", g.op("Range", zero, seq, one), past), g.const([1], np.int64))
    k_pos = g.op("Unsqueeze", g.op("Range", zero, g.op("Add", past, seq), one), g.const([0], np.int64))
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2], np.int64)), to=T.BOOL)
    causal = g.op("LessOrEqual", k_pos, q_pos)
    biases: dict[int | None, str] = {}
    windows = _sliding_windows(config)
    for window in sorted(set(windows), key=lambda w: -1 if w is None else w):
        allowed = causal if window is None else \
            g.op("And", causal, g.op("Less", g.op("Sub", q_pos, k_pos), g.const(window, np.int64)))
        biases[window] = g.op("Where", g.op("And", allowed, keep), g.const(0.0),
                              g.const(float(np.finfo(np.float32).min)), hint="attention_bias")

    x = g.op("Gather", g.init("model.embed_tokens.weight", _np(base.embed_tokens.weight.float())), "input_ids")
    half = head_dim // 2
    for i, block in enumerate(layers):
        name = f"model.layers.{i}"
        attn = block.self_attn
        h = _rms_norm(g, x, block.input_layernorm, f"{name}.input_layernorm")
        q_proj = linear(g, h, attn.q_proj, f"{name}.self_attn.q_proj", record)
        heads = (attn.q_proj.out_features if hasattr(attn.q_proj, "out_features") else
                 attn.q_proj.weight.shape[0]) // head_dim
        q = _rotate(g, _split_heads(g, q_proj, heads, head_dim), cos, sin, half)
        k = _rotate(g, _split_heads(g, linear(g, h, attn.k_proj, f"{name}.self_attn.k_proj", record),
                                    kv_heads[i], head_dim), cos, sin, half)
        v = _split_heads(g, linear(g, h, attn.v_proj, f"{name}.self_attn.v_proj", record), kv_heads[i], head_dim)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
        if heads != kv_heads[i]:  # grouped-query attention: each KV head serves heads / kv_heads queries
            groups = heads // kv_heads[i]
            shape = g.op("Concat", g.op("Shape", k, end=2), g.const([groups], np.int64), g.op("Shape", k, start=2),
                         axis=0)
            k, v = (g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, g.const([2], np.int64)), shape),
                         g.const([0, heads, -1, head_dim], np.int64)) for t in (k, v))
        context = _merge_heads(g, _attend(g, q, k, v, biases[windows[i]], float(head_dim) ** -0.5))
        x = g.op("Add", x, linear(g, context, attn.o_proj, f"{name}.self_attn.o_proj", record))
        h = _rms_norm(g, x, block.post_attention_layernorm, f"{name}.post_attention_layernorm")
        gate = _activation(g, linear(g, h, block.mlp.gate_proj, f"{name}.mlp.gate_proj", record), config.hidden_act)
        up = linear(g, h, block.mlp.up_proj, f"{name}.mlp.up_proj", record)
        x = g.op("Add", x, linear(g, g.op("Mul", gate, up), block.mlp.down_proj, f"{name}.mlp.down_proj", record))
    x = _rms_norm(g, x, base.norm, "model.norm")
    head = model.lm_head
    if not _is_quant(head) and head.weight is base.embed_tokens.weight:  # tied: read the embedding, transposed
        logits = g.op("MatMul", x, g.op("Transpose", "model.embed_tokens.weight", perm=[1, 0]))
        logits = _bias(g, logits, head, "lm_head")
    else:
        logits = linear(g, x, head, "lm_head", record)
    g.op("Identity", logits, out="logits")
    return inputs, outputs


# --- the export ---------------------------------------------------------------------------------

def supported() -> tuple[str, ...]:
    return ENCODERS + CAUSAL


def build(model: Any) -> tuple[Any, dict[str, Any]]:
    """``(onnx ModelProto, record)`` of a loaded model: see the module docstring."""
    onnx = _onnx()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in supported():
        raise SecateurError(f"onnx export writes {one_of(supported())} models; this one is "
                            f"'{model_type or type(model).__name__}'")
    g = _Graph()
    record: dict[str, Any] = {"quantization": {}}
    with torch.no_grad():
        inputs, outputs = (_encoder if model_type in ENCODERS else _causal)(g, model, record)
    graph = onnx.helper.make_graph(g.nodes, f"secateur-{model_type}", inputs, outputs, g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="secateur", producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 10)  # ONNX Runtime's supported IR version for opset 21
    record.update(kind="encoder" if model_type in ENCODERS else "causal", model_type=model_type, opset=OPSET,
                  inputs=[i.name for i in inputs], outputs=[o.name for o in outputs])
    return proto, record


def _scheme(record: dict[str, Any]) -> str:
    """``"w8a8"`` when any layer quantizes its activations (looser tolerance), else ``"float"``."""
    return "w8a8" if any(e.get("activations") for e in record["quantization"].values()) else "float"


def _check_inputs(model: Any, kind: str) -> dict[str, torch.Tensor]:
    """A fixed input: two sequences of 12 and 7 tokens (the second padded), seed 0."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    if kind == "causal":  # left padding, as batched generation pads
        mask = mask.flip(1)
    return {"input_ids": ids, "attention_mask": mask}


def verify(model: Any, path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Run the export at ``path`` in ONNX Runtime and compare with ``model`` (secateur's reference path)
    on a fixed input; raise when the difference exceeds the tolerance. Returns the verification entry."""
    from ..runtime import ort_session
    from ..runtime.linear import reference_only

    sess = ort_session.session(path)
    kind, scheme = record["kind"], _scheme(record)
    tolerance = TOLERANCE[scheme]
    feed = _check_inputs(model, kind)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    entry: dict[str, Any] = {"runtime": "onnxruntime", "compared_with": "secateur, reference path (reference_only)",
                             "input": "2 random sequences of 12 tokens (one padded to 7), seed 0",
                             "tolerance": tolerance, "measure": "max |onnx - secateur| / max(1, max |secateur|)"}
    with torch.no_grad(), reference_only():
        if kind == "encoder":
            body = getattr(model, "base_model", model)
            hidden = body(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))[0].float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            got = ort_session.embed(sess, ids.numpy(), mask.numpy())
            errors = {"last_hidden_state": _error(got["last_hidden_state"], hidden),
                      "sentence_embedding": _error(got["sentence_embedding"], pooled)}
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            ref = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
            logits, _ = ort_session.step(sess, ids.numpy(), ort_session.empty_cache(sess, 2), mask.numpy(),
                                         positions.numpy())
            real = mask.bool()
            errors = {"logits": _error(logits[real.numpy()], ref[real])}
            prompt, new = ids[0, :8].tolist(), 4
            tokens = ort_session.greedy_decode(sess, prompt, new)
            ours, sequence = [], torch.tensor([prompt])
            for _ in range(new):
                last = model(input_ids=sequence, use_cache=False).logits[0, -1].float()
                ours.append(int(last.argmax()))
                sequence = torch.cat([sequence, torch.tensor([[ours[-1]]])], dim=1)
            entry["greedy_tokens"] = {"onnx": tokens, "secateur": ours, "prompt": prompt}
            if tokens != ours:
                raise SecateurError(f"onnx export: greedy tokens through the KV cache differ from secateur's "
                                    f"({tokens} vs {ours}); the export at {path} is not trustworthy")
    entry["max_error"] = errors
    worst = max(errors.values())
    if not worst <= tolerance:
        raise SecateurError(f"onnx export: ONNX Runtime's outputs differ from secateur's by {worst:.3g} "
                            f"(tolerance {tolerance}); the export at {path} is not trustworthy")
    entry["passed"] = True
    return entry


def _error(got: np.ndarray, ref: torch.Tensor) -> float:
    ref_np = ref.detach().cpu().numpy()
    return float(np.abs(got - ref_np).max() / max(1.0, float(np.abs(ref_np).max())))


def _source(loaded: Any, artifact: Any) -> dict[str, Any]:
    card = loaded.info.get("card") or {}
    history = [step.get("method") for step in card.get("history", []) if isinstance(step, dict)]
    return {"path": str(Path(artifact).expanduser().absolute()) if Path(str(artifact)).exists() else str(artifact),
            "weights_sha256": loaded.info.get("weights_sha256"), "card_seal": card.get("seal"),
            "base_model": card.get("base_model"), "methods": history,
            "storage": (card.get("storage") or {}).get("format", "dense")}


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``; an earlier export there is replaced."""
    if target.exists():
        if not (target / CARD).is_file():
            raise SecateurError(f"'{target}' exists and is not an ONNX export; choose another output")
        trash = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write(model: Any, out: str | os.PathLike, *, tokenizer: Any = None, source: dict[str, Any] | None = None,
          check: bool = True) -> Path:
    """Export a loaded ``model`` to the folder ``out`` (``model.onnx``, ``onnx_export.json``, the tokenizer);
    with ``check`` (and onnxruntime installed) verified against the model first. Returns the folder."""
    onnx = _onnx()
    target = Path(out).expanduser().absolute()
    if target.exists() and not (target / CARD).is_file():
        raise SecateurError(f"'{target}' exists and is not an ONNX export; choose another output")
    proto, record = build(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        external = sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
        onnx.save_model(proto, str(tmp / MODEL_NAME), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=MODEL_NAME + ".data")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card = {"format": "onnx", "secateur_version": __version__, "file": MODEL_NAME,
                "external_data": MODEL_NAME + ".data" if external else None, "source": source or {},
                **record, "quantized_layers": len(record["quantization"]),
                "runtime_note": ("ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits and by default "
                                 "rounds its activations to int8; secateur.runtime.ort_session.session sets "
                                 "session.qdq_matmulnbits_accuracy_level=0 to keep float activations")}
        card["verification"] = _verify_or_skip(model, tmp / MODEL_NAME, record) if check else {"skipped": "check=False"}
        (tmp / CARD).write_text(json.dumps(card, indent=1, default=str) + "\n", encoding="utf-8")
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", record["model_type"], target)
    return target


def _verify_or_skip(model: Any, path: Path, record: dict[str, Any]) -> dict[str, Any]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"skipped": f"onnxruntime is not installed ({INSTALL_HINT})"}
    return verify(model, path, record)


def export_onnx(artifact: str | os.PathLike, out: str | os.PathLike, *, check: bool = True) -> Path:
    """Export the model at ``artifact`` (a secateur artifact, verified first, or a model folder) to the
    ONNX folder ``out``; see the module docstring. Returns the folder."""
    from .checkpoint import load
    from ..models.arch import ARCHS

    from ..models import resolve

    _onnx()
    try:
        config = json.loads((resolve(str(artifact)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SecateurError(f"onnx export: cannot read the config.json of '{artifact}' ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in supported():
        where = "is outside secateur's architecture table" if model_type not in ARCHS else "is not written yet"
        raise SecateurError(f"onnx export: '{artifact}' is a {model_type} model, which {where}; "
                            f"onnx export writes {one_of(supported())}")
    loaded = load(artifact)
    return write(loaded.model, out, tokenizer=loaded.tokenizer, source=_source(loaded, artifact), check=check)


__all__ = ["export_onnx", "write", "build", "verify", "linear", "supported", "OPSET", "TOLERANCE", "CARD",
           "MODEL_NAME"]
