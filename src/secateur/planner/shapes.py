"""A model as the planner sees it: shapes and sizes, read from its config, never its weights.

``ModelShape.of(path)`` builds the model on the meta device (no memory, no weights read) and
records per block every projection's ``(d_in, d_out)`` and which input group it belongs to (q/k/v
read one tensor, so a calibrated method keeps one statistic for them), plus the widths that decide
activation sizes (hidden, intermediate, heads, sequence), the parameter count and the bytes the
weights take on disk. A variant not built yet gets its shape from its parent's by
:meth:`ModelShape.after`: a structured step shrinks it (its own ``describe`` says to what), a
quantization changes the bytes, everything else keeps it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SecateurError


@dataclass(frozen=True)
class Projection:
    name: str        # full module name
    block: int
    d_in: int
    d_out: int
    leader: str      # the input group it belongs to (its own name when it reads a tensor alone)

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    kind: str                                   # "causal" | "encoder"
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    blocks: int
    projections: tuple[Projection, ...]         # every projection of every block
    params: int                                 # all parameters (embeddings, head, norms too)
    disk_bytes: int                             # what the weights take on disk (what a load reads)
    memory_bytes: int                           # what the loaded weights take in memory
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # sizes the cost terms read
    @property
    def block_params(self) -> int:
        return sum(p.numel for p in self.projections) // max(self.blocks, 1)

    @property
    def max_block_bytes(self) -> int:
        """float32 bytes of the largest block's projections (what a calibrated method keeps a dense copy of)."""
        per_block: dict[int, int] = {}
        for p in self.projections:
            per_block[p.block] = per_block.get(p.block, 0) + p.numel
        return 4 * max(per_block.values(), default=0)

    def describe(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "kind": self.kind, "blocks": self.blocks, "hidden": self.hidden,
                "intermediate": self.intermediate, "heads": self.heads, "vocab": self.vocab, "params": self.params,
                "disk_bytes": self.disk_bytes}

    # --- reading a model ---------------------------------------------------------------------------
    @classmethod
    def of(cls, path: str | Path) -> "ModelShape":
        """The shape of the model at ``path`` (a directory with ``config.json``), from its config."""
        from transformers import AutoConfig

        from ..models import resolve

        folder = Path(resolve(str(path)))
        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise SecateurError(f"cannot plan for '{path}': no readable config.json there ({exc})") from None
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors")) or \
            sum(f.stat().st_size for f in folder.glob("*.bin"))
        return cls.from_config(config.to_dict(), disk_bytes=disk or None)

    @classmethod
    def from_config(cls, config: Any, disk_bytes: int | None = None) -> "ModelShape":
        """From a config mapping, or a transformers config object (used as it is: a pruned model's
        widths, 6 heads of 8 on a hidden size of 64, say, need not pass the config's own checks)."""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from ..calibrate import input_groups
        from ..models.arch import arch_for
        from ..models.layers import weight_matrix

        cfg = dict(config) if isinstance(config, dict) else config.to_dict()
        model_type = cfg.get("model_type")
        if not model_type:
            raise SecateurError("cannot plan: the model's config has no model_type")
        arch = arch_for(model_type)
        hf_config = AutoConfig.for_model(**cfg) if isinstance(config, dict) else config
        auto = AutoModelForCausalLM if arch.kind == "causal" else AutoModel
        with torch.device("meta"):
            model = auto.from_config(hf_config)
        prefix = arch.block_prefix(model)
        roles = arch.projections()
        projections = []
        for i, block in enumerate(arch.get_blocks(model)):
            names = [f"{prefix}.{i}.{path}" for path in roles.values() if _has(block, path)]
            leaders = {m: leader for leader, members in input_groups(arch, f"{prefix}.{i}", names).items()
                       for m in members}
            for name in names:
                d_out, d_in = weight_matrix(model.get_submodule(name)).shape
                projections.append(Projection(name, i, int(d_in), int(d_out), leaders[name]))
        params = sum(p.numel() for p in model.parameters())
        dtype_bytes = torch.finfo(next(model.parameters()).dtype).bits // 8
        hidden = int(getattr(hf_config, "hidden_size"))
        heads = int(getattr(hf_config, "num_attention_heads"))
        intermediate = max((p.d_out for p in projections if p.d_in == hidden and p.d_out != hidden), default=4 * hidden)
        memory = params * dtype_bytes
        return cls(model_type=model_type, kind=arch.kind, hidden=hidden, intermediate=int(intermediate), heads=heads,
                   kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(hf_config, "head_dim", None) or hidden // heads),
                   vocab=int(getattr(hf_config, "vocab_size")), blocks=len(arch.get_blocks(model)),
                   projections=tuple(projections), params=params,
                   disk_bytes=int(disk_bytes if disk_bytes is not None else memory), memory_bytes=memory, config=cfg)

    # --- a variant's shape from its parent's ---------------------------------------------------------
    def after(self, step: Any) -> "ModelShape":
        """The shape after ``step`` (a method config): structured steps shrink, quantization shrinks the bytes."""
        method = getattr(step, "method", "")
        if method == "structured":
            return self._structured(step)
        bits = getattr(step, "bits", None)
        if method in ("gptq", "rtn", "awq", "mixed", "qat", "smoothquant") and bits:
            weight_params = sum(p.numel for p in self.projections)
            saved = int(weight_params * 4 * (1 - bits / 32))          # float32 -> bits, scales are small
            return dataclasses.replace(self, disk_bytes=max(self.disk_bytes - saved, self.disk_bytes // 8),
                                       memory_bytes=max(self.memory_bytes - int(weight_params * 4 * (1 - 8 / 32)),
                                                        self.memory_bytes // 4))
        if method == "fp8":
            weight_params = sum(p.numel for p in self.projections)
            return dataclasses.replace(self, disk_bytes=self.disk_bytes - weight_params * 3,
                                       memory_bytes=self.memory_bytes - weight_params * 3)
        return self

    def _structured(self, step: Any) -> "ModelShape":
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from ..models.arch import arch_for
        from ..prune.structured import describe

        arch = arch_for(self.model_type)
        auto = AutoModelForCausalLM if arch.kind == "causal" else AutoModel
        with torch.device("meta"):
            model = auto.from_config(AutoConfig.for_model(**self.config))
        after = describe(model, step)["shapes"]["after"]
        hf = AutoConfig.for_model(**self.config)
        if after.get("layers"):
            hf.num_hidden_layers = int(after["layers"])
            for key in ("layer_types",):
                if isinstance(getattr(hf, key, None), list):
                    setattr(hf, key, getattr(hf, key)[: hf.num_hidden_layers])
        if after.get("intermediate"):
            hf.intermediate_size = int(after["intermediate"][0])
        if after.get("heads"):
            hf.head_dim = self.head_dim
            hf.num_attention_heads = int(after["heads"][0])
            if after.get("kv_heads") and hasattr(hf, "num_key_value_heads"):
                hf.num_key_value_heads = int(after["kv_heads"][0])
        if after.get("hidden") and after["hidden"] != self.hidden:
            hf.hidden_size = int(after["hidden"])
        shape = ModelShape.from_config(hf)
        return dataclasses.replace(shape, disk_bytes=int(self.disk_bytes * shape.params / max(self.params, 1)))


def _has(block: Any, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


__all__ = ["ModelShape", "Projection"]
