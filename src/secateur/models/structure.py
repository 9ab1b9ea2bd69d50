"""What structured pruning can remove, and how it is physically removed.

Two of the four separate ideas of structured pruning (Torch-Pruning's view): the *coupling* —
which slices of which tensors form one unit — and the *removal* — slicing them out so the tensors
really shrink. Scoring lives in ``importance.py``; how much to remove where in ``structured.py``.

The units, from the architecture table (no per-family code):

- **query head** ``h`` of a block: rows ``h·d … (h+1)·d`` of q (and its bias), the same columns of
  o. **KV head** ``g``: those rows of k and v. Under grouped-query attention query head ``h`` reads
  KV head ``h // (heads / kv_heads)``; removals keep every group the same size so that the
  model's own ``repeat_kv`` still pairs them correctly. GPT-2's fused ``c_attn`` holds q, k and v
  side by side on its output axis.
- **MLP channel** ``j``: row ``j`` of gate and up (and their biases), column ``j`` of down.
- **block**: the whole block; the rest are renumbered (``layer_idx``) and every per-layer list in
  the config (``layer_types`` …) is cut to match.
- **hidden channel** ``c`` (the residual stream, Minitron's width): column ``c`` of every embedding,
  entry ``c`` of every norm, input column ``c`` of every projection reading the stream (q, k, v,
  gate, up, the head) and output row ``c`` (and bias) of every projection writing it (o, down).

After removal the config is updated. When every block has the same shape the result is an
ordinary checkpoint (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``, ``num_hidden_layers``, ``hidden_size``). Otherwise — shapes that differ per
block, or a family whose config derives ``head_dim`` from ``hidden_size / heads`` (BERT, OPT,
GPT-2) after heads or width were removed — :func:`layout` describes the difference, the artifact
records it, and :func:`rebuild` re-creates the model from config + layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import SecateurError
from ..models import layers

log = logging.getLogger(__name__)


# --- slicing one module ------------------------------------------------------------------------
def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.contiguous().clone(), requires_grad=old.requires_grad)


def _index(index: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(index, dtype=torch.long, device=device)


def slice_linear(module: nn.Module, side: str, index: Sequence[int] | torch.Tensor) -> None:
    """Keep only the output rows (``side="out"``, with the bias) or input columns (``"in"``) in
    ``index`` of a Linear (weight ``[out, in]``) or GPT-2 Conv1D (weight ``[in, out]``)."""
    weight = module.weight
    idx = _index(index, weight.device)
    axis = layers.out_axis(module) if side == "out" else 1 - layers.out_axis(module)
    module.weight = _param(weight, weight.detach().index_select(axis, idx))
    bias = getattr(module, "bias", None)
    if side == "out" and bias is not None:
        module.bias = _param(bias, bias.detach().index_select(0, idx))
    layers.set_features(module, **({"out": len(idx)} if side == "out" else {"in_": len(idx)}))


def slice_norm(module: nn.Module, index: Sequence[int] | torch.Tensor) -> None:
    """Keep entries ``index`` of a LayerNorm / RMSNorm (weight and bias)."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter):
            setattr(module, name, _param(p, p.detach().index_select(0, _index(index, p.device))))
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (len(index),)


def slice_embedding(module: nn.Module, index: Sequence[int] | torch.Tensor) -> None:
    w = module.weight
    module.weight = _param(w, w.detach().index_select(1, _index(index, w.device)))
    module.embedding_dim = len(index)


out_features, in_features = layers.out_features, layers.in_features


# --- the shapes of a model -------------------------------------------------------------------
def _optional(root: nn.Module, path: str) -> nn.Module | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) else None


@dataclass(frozen=True)
class BlockShape:
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")   # what attention modules call their per-head width
_FIXED_ATTRS = _HEAD_DIM_ATTRS + ("scaling",)             # set at construction from the config


def head_dim(model: nn.Module) -> int:
    """The per-head width, which structured pruning never changes (read from the attention module:
    a config that derives it from ``hidden_size / heads`` may no longer say it)."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    attention = facts.arch.get_blocks(model)[0].get_submodule(facts.arch.attention)
    for attr in _HEAD_DIM_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            return int(getattr(attention, attr))
    return int(facts.sizes["head_dim"])


def block_shape(block: nn.Module, arch: Any, d: int) -> BlockShape:
    """Heads, KV heads and MLP channels of one block, read from its weights."""
    if "qkv" in arch.attn:
        heads = kv = out_features(block.get_submodule(arch.attn["qkv"])) // (3 * d)
    else:
        heads = out_features(block.get_submodule(arch.attn["q"])) // d
        kv = out_features(block.get_submodule(arch.attn["k"])) // d
    return BlockShape(heads, kv, in_features(block.get_submodule(arch.mlp["down"])))


def shapes(model: nn.Module) -> dict[str, Any]:
    """Per-block heads / KV heads / MLP channels, the hidden width and the parameter count."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    d = head_dim(model)
    blocks = [block_shape(b, facts.arch, d) for b in facts.arch.get_blocks(model)]
    hidden = facts.arch.get_embeddings(model)[0].weight.shape[1]
    return {"layers": len(blocks), "hidden": hidden, "head_dim": d, "heads": [b.heads for b in blocks],
            "kv_heads": [b.kv_heads for b in blocks], "intermediate": [b.intermediate for b in blocks],
            "parameters": sum(p.numel() for p in model.parameters())}


# --- removal -----------------------------------------------------------------------------------
def _rows(units: Sequence[int], d: int, offset: int = 0) -> list[int]:
    return [offset + u * d + i for u in units for i in range(d)]


def check_heads(shape: BlockShape, keep_q: Sequence[int], keep_kv: Sequence[int]) -> None:
    """Raise unless the kept query heads read only kept KV heads, as equal groups in order."""
    if not keep_q or not keep_kv:
        raise SecateurError("structured pruning would remove every attention head of a block; keep at least one")
    if list(keep_q) != sorted(set(keep_q)) or list(keep_kv) != sorted(set(keep_kv)):
        raise SecateurError("kept heads must be sorted and unique")
    if keep_q[-1] >= shape.heads or keep_kv[-1] >= shape.kv_heads:
        raise SecateurError(f"kept heads out of range for a block with {shape.heads} heads / {shape.kv_heads} KV heads")
    per_group: dict[int, int] = {}
    for h in keep_q:
        per_group[h // shape.groups] = per_group.get(h // shape.groups, 0) + 1
    if sorted(per_group) != list(keep_kv) or len(set(per_group.values())) != 1:
        raise SecateurError("under grouped-query attention every kept KV head must keep the same number of "
                            f"query heads (kept query heads {list(keep_q)}, KV heads {list(keep_kv)}, "
                            f"{shape.groups} query heads per KV head)")


def remove_heads(model: nn.Module, layer: int, keep_q: Sequence[int], keep_kv: Sequence[int] | None = None) -> None:
    """Keep query heads ``keep_q`` and KV heads ``keep_kv`` (default: those the kept query heads
    read) of block ``layer``; q/k/v/o and their biases are sliced together."""
    from ..models.arch import arch_of

    arch = arch_of(model).arch
    d = head_dim(model)
    block = arch.get_blocks(model)[layer]
    shape = block_shape(block, arch, d)
    keep_q = sorted(int(h) for h in keep_q)
    if keep_kv is None:
        keep_kv = sorted({h // shape.groups for h in keep_q})
    keep_kv = sorted(int(g) for g in keep_kv)
    check_heads(shape, keep_q, keep_kv)
    if "qkv" in arch.attn:  # fused, q | k | v along the output axis
        width = shape.heads * d
        rows = _rows(keep_q, d) + _rows(keep_kv, d, width) + _rows(keep_kv, d, 2 * width)
        slice_linear(block.get_submodule(arch.attn["qkv"]), "out", rows)
    else:
        slice_linear(block.get_submodule(arch.attn["q"]), "out", _rows(keep_q, d))
        for role in ("k", "v"):
            slice_linear(block.get_submodule(arch.attn[role]), "out", _rows(keep_kv, d))
    slice_linear(block.get_submodule(arch.attn["o"]), "in", _rows(keep_q, d))
    set_head_attrs(block, arch, BlockShape(len(keep_q), len(keep_kv), shape.intermediate), d)


def set_head_attrs(block: nn.Module, arch: Any, shape: BlockShape, d: int) -> dict[str, int]:
    """Write the block's head counts onto its attention module (the attributes its forward reads)."""
    values = {"heads": shape.heads, "kv_heads": shape.kv_heads, "groups": shape.groups, "width": shape.heads * d}
    attention = block.get_submodule(arch.attention)
    attrs = {attr: values[what] for attr, what in arch.head_attrs.items()}
    for attr, value in attrs.items():
        setattr(attention, attr, value)
    return attrs


def remove_channels(model: nn.Module, layer: int, keep: Sequence[int]) -> None:
    """Keep MLP channels ``keep`` of block ``layer``: rows of gate/up (+ biases), columns of down."""
    from ..models.arch import arch_of

    arch = arch_of(model).arch
    block = arch.get_blocks(model)[layer]
    keep = sorted(int(j) for j in keep)
    if not keep:
        raise SecateurError("structured pruning would remove every MLP channel of a block; keep at least one")
    for role, path in arch.mlp.items():
        slice_linear(block.get_submodule(path), "in" if role == "down" else "out", keep)


def remove_blocks(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove whole blocks; renumber the rest and cut every per-layer config list. Returns the kept
    original indices."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    arch = facts.arch
    blocks = arch.get_blocks(model)
    n = len(blocks)
    drop = sorted({int(i) for i in drop})
    if any(i < 0 or i >= n for i in drop):
        raise SecateurError(f"blocks to remove {drop} out of range: the model has blocks 0..{n - 1}")
    keep = [i for i in range(n) if i not in drop]
    if not keep:
        raise SecateurError(f"structured pruning would remove all {n} blocks; keep at least one")
    parent = arch.base(model).get_submodule(arch.blocks.rsplit(".", 1)[0]) if "." in arch.blocks else arch.base(model)
    setattr(parent, arch.blocks.rsplit(".", 1)[-1], nn.ModuleList([blocks[i] for i in keep]))
    for new, block in enumerate(arch.get_blocks(model)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and not key.startswith("_"):
            setattr(config, key, type(value)(value[i] for i in keep))
    setattr(config, arch.fields["layers"], len(keep))
    return keep


def remove_hidden(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep residual-stream channels ``keep`` everywhere: embeddings, norms, every projection that
    reads or writes the stream, extra modules of the table and the head (re-tied if tied)."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    arch = facts.arch
    keep = sorted(int(c) for c in keep)
    if not keep:
        raise SecateurError("structured pruning would remove the whole hidden width; keep at least one channel")
    embeddings = arch.get_embeddings(model)
    head = arch.get_head(model)
    tied = head is not None and head.weight is embeddings[0].weight
    if facts.model_type == "opt" and getattr(model.config, "word_embed_proj_dim", None) not in (None, model.config.hidden_size):
        raise SecateurError("hidden-width pruning of OPT models with a projected embedding (word_embed_proj_dim != "
                            "hidden_size) is not supported")
    for emb in embeddings:
        slice_embedding(emb, keep)
    base = arch.base(model)
    for path, side in arch.hidden_extra:
        module = _optional(base, path)
        if module is None:
            continue
        if side == "norm":
            slice_norm(module, keep)
        for s in ("in", "out"):
            if side in (s, "both"):
                slice_linear(module, s, keep)
    writes = {arch.attn["o"], arch.mlp["down"]}
    for block in arch.get_blocks(model):
        for path in arch.norms.values():
            slice_norm(block.get_submodule(path), keep)
        for path in list(arch.attn.values()) + list(arch.mlp.values()):
            slice_linear(block.get_submodule(path), "out" if path in writes else "in", keep)
    if arch.final_norm:
        slice_norm(arch.get_final_norm(model), keep)
    if head is not None:
        if tied:
            head.weight = embeddings[0].weight
        else:
            slice_linear(head, "in", keep)
        if hasattr(head, "in_features"):
            head.in_features = len(keep)


# --- config and layout -------------------------------------------------------------------------
def sync_config(model: nn.Module) -> dict[str, Any]:
    """Write the model's real shapes into its config where ordinary fields can describe them;
    returns :func:`shapes` (with ``config_note`` when transformers' own validation refused a head
    count). Per-block differences are left to :func:`layout`."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    arch, config = facts.arch, model.config
    s = shapes(model)
    fields = arch.fields
    if "embedding" in fields and getattr(config, fields["embedding"], None) == getattr(config, fields["hidden"]):
        setattr(config, fields["embedding"], s["hidden"])  # an embedding as wide as the stream stays so
    setattr(config, fields["layers"], s["layers"])
    if len(set(s["intermediate"])) == 1:
        setattr(config, fields["intermediate"], s["intermediate"][0])
    uniform_heads = len(set(s["heads"])) == 1 and len(set(s["kv_heads"])) == 1
    if "head_dim" in fields:  # families with an explicit head_dim can describe any head count…
        setattr(config, fields["head_dim"], s["head_dim"])
        setattr(config, fields["hidden"], s["hidden"])
        if uniform_heads:
            old = {f: getattr(config, fields[f]) for f in ("heads", "kv_heads") if f in fields}
            setattr(config, fields["heads"], s["heads"][0])
            if "kv_heads" in fields:
                setattr(config, fields["kv_heads"], s["kv_heads"][0])
            try:  # …unless transformers' own config validation refuses it
                if hasattr(config, "validate"):
                    config.validate()
            except Exception as exc:  # noqa: BLE001 - any validation failure means: keep the old counts
                for f, value in old.items():
                    setattr(config, fields[f], value)
                s["config_note"] = (f"{s['heads'][0]} heads kept out of config.json ({exc}); the artifact records "
                                    "its layout and secateur.load rebuilds it")
    else:  # head_dim derived as hidden / heads: describable only while that still holds
        setattr(config, fields["hidden"], s["hidden"])
        if uniform_heads and s["hidden"] == s["heads"][0] * s["head_dim"]:
            setattr(config, fields["heads"], s["heads"][0])
    return s


# modules secateur adds beside the architecture (early-exit heads): saved with the weights, rebuilt
# by the artifacts room, never part of the config's shapes
ADDONS = ("secateur_",)


def layout(model: nn.Module) -> dict[str, Any] | None:
    """What differs from the model its config describes: ``{"shapes": {param: shape}, "attrs":
    {module: {attr: value}}}``, or None when the config describes the model exactly."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    with torch.device("meta"):
        reference = type(model)(model.config)
    ref_shapes = {n: tuple(p.shape) for n, p in reference.named_parameters(remove_duplicate=False)}
    diff = {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)
            if ref_shapes.get(n) != tuple(p.shape) and not n.startswith(ADDONS)}
    have = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    have |= {n for n, _ in model.named_buffers()}
    quantized = {name for name, m in model.named_modules() if hasattr(m, "dequantized_weight")}
    missing = sorted(n for n in set(ref_shapes) - have if n.rpartition(".")[0] not in quantized)
    if missing:
        raise SecateurError(f"the model lacks parameters its config describes ({missing[:3]}); cannot record a layout")
    if not diff:
        return None
    arch = facts.arch
    prefix = arch.block_prefix(model)
    attrs = {}
    for i, block in enumerate(arch.get_blocks(model)):
        attention = block.get_submodule(arch.attention)
        names = list(arch.head_attrs) + [a for a in _FIXED_ATTRS if isinstance(getattr(attention, a, None), (int, float))]
        attrs[f"{prefix}.{i}.{arch.attention}"] = {a: getattr(attention, a) for a in names}
    return {"shapes": diff, "attrs": attrs}


def _resize(module: nn.Module, name: str, shape: list[int]) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                       requires_grad=old.requires_grad))
    if name != "weight":
        return
    if layers.is_projection(module):
        layers.set_features(module, layers.out_features(module), layers.in_features(module))
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = shape
    elif hasattr(module, "normalized_shape"):
        module.normalized_shape = tuple(shape)


def apply_layout(model: nn.Module, recorded: dict[str, Any]) -> nn.Module:
    """Give a freshly built ``model`` the recorded per-module shapes and attention attributes
    (its weights are then loaded over them)."""
    for name, shape in recorded.get("shapes", {}).items():
        owner, _, attr = name.rpartition(".")
        _resize(model.get_submodule(owner), attr, shape)
    for name, attrs in recorded.get("attrs", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
    return model


def rebuild(model_class: Any, config: Any, recorded: dict[str, Any], state_dict: dict[str, torch.Tensor],
            dtype: Any = None) -> nn.Module:
    """Build ``model_class`` from ``config``, apply the recorded layout, load ``state_dict``."""
    model = model_class(config)
    apply_layout(model, recorded)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise SecateurError(f"the weights do not match the recorded layout (missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
