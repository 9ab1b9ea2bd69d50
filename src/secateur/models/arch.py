"""Architecture differences as data: one table, no per-family code.

Each row says where a family keeps its blocks, embeddings, final norm and head (paths relative
to the Hugging Face *base model*, i.e. ``model.base_model``, except the head which hangs off the
top-level model), how its attention and MLP projections are named inside a block, which config
fields carry the shapes, and what a block needs as arguments when it is called on its own.

Adding a family is adding a row. Families that share a layout share a row object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import SecateurError, one_of


@dataclass(frozen=True)
class Arch:
    kind: str                                  # "causal" (decoder LM) or "encoder"
    blocks: str                                # ModuleList of blocks, relative to the base model
    embeddings: tuple[str, ...]                # token (first) and position/type embeddings
    final_norm: str | None                     # norm after the last block (None: none)
    head: str | None                           # output head, relative to the top model
    attn: dict[str, str]                       # role -> path in a block: q, k, v, o (or qkv when fused)
    mlp: dict[str, str]                        # role -> path in a block: gate, up, down
    norms: dict[str, str]                      # "attn"/"mlp" -> norm feeding that sub-block
    fields: dict[str, str]                     # canonical name -> config attribute
    block_kwargs: tuple[str, ...] = ("attention_mask",)   # what a block is called with
    rotary: str | None = None                  # rotary embedding module, relative to the base model
    layer_class: str = "Linear"                # class name of the projection layers (models/layers.py)
    transposed: bool = False                   # layer_class stores its weight [in, out] (GPT-2 Conv1D)
    # groups of projections that read the same input (they share calibration statistics)
    shared_inputs: tuple[tuple[str, ...], ...] = field(default=())
    # structured pruning: the attention module of a block and the attributes on it that carry its
    # head counts ("heads", "kv_heads", "groups" = heads per KV head, "width" = heads × head_dim)
    attention: str | None = None
    head_attrs: dict[str, str] = field(default_factory=dict)
    # other modules of the base model on the residual stream, with the side that carries it:
    # "norm" (a norm over it), "in" (reads it), "out" (writes it), "both"; missing ones are skipped
    hidden_extra: tuple[tuple[str, str], ...] = field(default=())
    # activation-aware scaling (AWQ, SmoothQuant): the op before each group of projections, into
    # whose output a per-channel scale can be folded — a norm or a projection (its output rows)
    # whose output feeds only that group (a post-norm model's norms also feed the residual: no)
    smooth: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    # --- resolving paths on a concrete model ------------------------------------------------
    def base(self, model: nn.Module) -> nn.Module:
        return getattr(model, "base_model", model)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).get_submodule(self.blocks)

    def get_embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [self.base(model).get_submodule(p) for p in self.embeddings]

    def get_final_norm(self, model: nn.Module) -> nn.Module | None:
        return self.base(model).get_submodule(self.final_norm) if self.final_norm else None

    def get_head(self, model: nn.Module) -> nn.Module | None:
        if self.head is None or not hasattr(model, self.head.split(".")[0]):
            return None
        return model.get_submodule(self.head)

    def block_prefix(self, model: nn.Module) -> str:
        """Full module name of the blocks list, e.g. ``model.layers``."""
        base = self.base(model)
        prefix = next((n for n, m in model.named_modules() if m is base), "")
        return f"{prefix}.{self.blocks}" if prefix else self.blocks

    def projections(self) -> dict[str, str]:
        return {**{f"attn.{k}": v for k, v in self.attn.items()}, **{f"mlp.{k}": v for k, v in self.mlp.items()}}


_LLAMA = Arch(
    kind="causal", blocks="layers", embeddings=("embed_tokens",), final_norm="norm", head="lm_head",
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    mlp={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    norms={"attn": "input_layernorm", "mlp": "post_attention_layernorm"},
    fields={"hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
            "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "vocab": "vocab_size", "context": "max_position_embeddings"},
    block_kwargs=("attention_mask", "position_ids", "position_embeddings"), rotary="rotary_emb",
    shared_inputs=(("attn.q", "attn.k", "attn.v"), ("mlp.gate", "mlp.up")),
    attention="self_attn", head_attrs={"num_key_value_groups": "groups"},
    smooth=(("input_layernorm", ("attn.q", "attn.k", "attn.v")), ("post_attention_layernorm", ("mlp.gate", "mlp.up")),
            ("mlp.up_proj", ("mlp.down",)), ("self_attn.v_proj", ("attn.o",))),
)

_OPT = Arch(
    kind="causal", blocks="decoder.layers", embeddings=("decoder.embed_tokens", "decoder.embed_positions"),
    final_norm="decoder.final_layer_norm", head="lm_head",
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
    mlp={"up": "fc1", "down": "fc2"},
    norms={"attn": "self_attn_layer_norm", "mlp": "final_layer_norm"},
    fields={"hidden": "hidden_size", "intermediate": "ffn_dim", "layers": "num_hidden_layers",
            "heads": "num_attention_heads", "vocab": "vocab_size", "context": "max_position_embeddings",
            "embedding": "word_embed_proj_dim"},
    block_kwargs=("attention_mask", "position_ids"),
    shared_inputs=(("attn.q", "attn.k", "attn.v"),),
    attention="self_attn", head_attrs={"num_heads": "heads"},
    hidden_extra=(("decoder.project_in", "out"), ("decoder.project_out", "in")),
    smooth=(("self_attn_layer_norm", ("attn.q", "attn.k", "attn.v")), ("final_layer_norm", ("mlp.up",)),
            ("self_attn.v_proj", ("attn.o",))),
)

_GPT2 = Arch(
    kind="causal", blocks="h", embeddings=("wte", "wpe"), final_norm="ln_f", head="lm_head",
    attn={"qkv": "attn.c_attn", "o": "attn.c_proj"},
    mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"},
    norms={"attn": "ln_1", "mlp": "ln_2"},
    fields={"hidden": "n_embd", "intermediate": "n_inner", "layers": "n_layer", "heads": "n_head",
            "vocab": "vocab_size", "context": "n_positions"},
    layer_class="Conv1D", transposed=True,
    attention="attn", head_attrs={"num_heads": "heads", "split_size": "width"},
    smooth=(("ln_1", ("attn.qkv",)), ("ln_2", ("mlp.up",))),
)

_BERT = Arch(
    kind="encoder", blocks="encoder.layer",
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    final_norm=None, head=None,
    attn={"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "o": "attention.output.dense"},
    mlp={"up": "intermediate.dense", "down": "output.dense"},
    norms={"attn_out": "attention.output.LayerNorm", "mlp_out": "output.LayerNorm"},
    fields={"hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
            "heads": "num_attention_heads", "vocab": "vocab_size", "context": "max_position_embeddings"},
    shared_inputs=(("attn.q", "attn.k", "attn.v"),),
    attention="attention.self", head_attrs={"num_attention_heads": "heads", "all_head_size": "width"},
    hidden_extra=(("embeddings.LayerNorm", "norm"), ("pooler.dense", "both")),
    smooth=(("attention.self.value", ("attn.o",)),),
)

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "opt": _OPT,
    "gpt2": _GPT2,
    "bert": _BERT, "roberta": _BERT,
}


@dataclass(frozen=True)
class ArchFacts:
    """The architecture row of a model together with its concrete sizes."""

    model_type: str
    arch: Arch
    sizes: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.arch.kind

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "kind": self.kind, **self.sizes}


def arch_for(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise SecateurError(f"unsupported architecture '{model_type}'; supported model types: {one_of(ARCHS)}")
    return ARCHS[model_type]


def arch_of(model: nn.Module, strict: bool = True) -> ArchFacts | None:
    """Look a Hugging Face model up in the table. ``strict=False`` returns None for other models."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        if strict:
            raise SecateurError(f"unsupported architecture '{model_type or type(model).__name__}'; "
                                f"supported model types: {one_of(ARCHS)}")
        return None
    arch = ARCHS[model_type]
    sizes = {name: getattr(config, attr, None) for name, attr in arch.fields.items()}
    if sizes.get("intermediate") is None and "hidden" in sizes and model_type == "gpt2":
        sizes["intermediate"] = 4 * sizes["hidden"]
    if sizes.get("heads") and sizes.get("hidden") and not sizes.get("head_dim"):
        sizes["head_dim"] = sizes["hidden"] // sizes["heads"]
    if "kv_heads" in sizes and sizes["kv_heads"] is None:
        sizes["kv_heads"] = sizes.get("heads")
    sizes["parameters"] = count_parameters(model)
    return ArchFacts(model_type, arch, sizes)


# buffers that hold a layer's weight in packed or low-precision form (QuantLinear, FP8Linear): they
# count as the weights they stand for
PACKED_WEIGHTS = ("weight_q", "weight_fp8")


def count_parameters(model: Any) -> int:
    """The model's parameters as its user counts them: every parameter once, plus each quantized
    layer's weight, which such layers keep as a buffer (int8 ``weight_q``, ``weight_fp8``)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for module in model.modules():
        for name in PACKED_WEIGHTS:
            buffer = module._buffers.get(name) if hasattr(module, "_buffers") else None
            if buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                total += buffer.numel()
    return total
