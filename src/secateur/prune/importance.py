"""How much each removable unit matters — the scoring piece of structured pruning.

Scores are computed on the dense model and never remove anything; ``structured.py`` decides from
them how much to remove where, and ``models/structure.py`` removes it. Higher score = more important.

Width (heads, KV heads, MLP channels, hidden channels):

``magnitude``   the L2 (or L1) norm of the unit's *group*: every weight and bias entry that is
                removed with it (``models/structure.py`` defines the groups).
``activation``  Minitron (Muralidharan et al. 2024, arXiv:2407.14679): mean over calibration
                tokens of |activation| of the channel — the MLP's intermediate activation (the
                input of down), the norm of each head's attention output (the input of o), the
                residual stream as the projections read it (the input of q/k/v and gate/up,
                summed over blocks). Observed through the one calibration loop.
``taylor``      first order (Molchanov et al. 2019; LLM-Pruner, Ma et al. 2023): Σ over calibration
                batches and over the group of |∂L/∂w · w|, the first-order change of the loss when
                the group is zeroed. L is the language-model loss for causal models; for encoders,
                which have no loss of their own, L = Σ_s r_s · e_s with e_s the mean-pooled
                embedding of sample s and r_s a seeded random unit vector, so that E|∂L/∂w·w| is
                proportional to how far the embedding moves.

Depth (blocks):

``influence``   ShortGPT (Men et al. 2024, arXiv:2403.03853): 1 − mean cosine similarity between
                a block's input and output hidden states over calibration tokens. Observed in the
                same calibration loop.
``loss``        measured: the quality drop on calibration data when only that block is skipped
                (causal: language-model loss; encoder: 1 − mean cosine between the final hidden
                states and the dense ones).
``taylor``      the Taylor score summed over the block's parameters.
``magnitude``   the L2 norm of the block's parameters (for completeness; rarely a good choice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..calibrate import Options, calibration_loss, sequential
from ..errors import SecateurError, one_of
from ..progress import track
from ..models.layers import stored
from ..models.structure import block_shape, head_dim

log = logging.getLogger(__name__)

WIDTH = ("magnitude", "activation", "taylor")
DEPTH = ("influence", "loss", "taylor", "magnitude")


@dataclass
class Scores:
    """Per-block unit scores (``heads``/``kv_heads``/``mlp``: block index -> tensor), ``hidden``
    per residual channel, ``blocks`` per block; float64, higher = more important."""

    method: str
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    blocks: torch.Tensor | None = None


def _mat(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of ``module`` as ``[out, in]``."""
    return stored(module, t)


# --- group sums: one definition of each unit's weights, shared by magnitude and Taylor ---------
def group_sums(model: nn.Module, elem: Callable[[nn.Parameter], torch.Tensor]) -> Scores:
    """Σ of ``elem(p)`` (an element-wise score of parameter ``p``) over each unit's group."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    arch = facts.arch
    d = head_dim(model)
    out = Scores("group")

    def e(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
        p = getattr(module, name, None)
        if p is None:
            return None
        t = elem(p).double()
        return _mat(module, t) if name == "weight" else t

    def rows(module: nn.Module) -> torch.Tensor:  # per output row, bias included
        s = e(module).sum(1)
        b = e(module, "bias")
        return s + b if b is not None else s

    def per_unit(v: torch.Tensor, size: int) -> torch.Tensor:
        return v.reshape(-1, size).sum(1)

    hidden = None

    def add_hidden(v: torch.Tensor) -> None:
        nonlocal hidden
        hidden = v.clone() if hidden is None else hidden + v

    blocks = []
    writes = {arch.attn["o"], arch.mlp["down"]}
    for i, block in enumerate(arch.get_blocks(model)):
        shape = block_shape(block, arch, d)
        if "qkv" in arch.attn:
            r = rows(block.get_submodule(arch.attn["qkv"]))
            w = shape.heads * d
            q, k, v = r[:w], r[w:2 * w], r[2 * w:]
        else:
            q, k, v = (rows(block.get_submodule(arch.attn[role])) for role in ("q", "k", "v"))
        o = e(block.get_submodule(arch.attn["o"])).sum(0)
        heads = per_unit(q + o, d)
        out.heads[i] = heads
        out.kv_heads[i] = per_unit(k + v, d) + heads.reshape(shape.kv_heads, shape.groups).sum(1)
        mlp = e(block.get_submodule(arch.mlp["down"])).sum(0)
        for role, path in arch.mlp.items():
            if role != "down":
                mlp = mlp + rows(block.get_submodule(path))
        out.mlp[i] = mlp
        for path in list(arch.attn.values()) + list(arch.mlp.values()):
            module = block.get_submodule(path)
            if path in writes:
                add_hidden(e(module).sum(1) + (e(module, "bias") if module.bias is not None else 0))
            else:
                add_hidden(e(module).sum(0))
        for path in arch.norms.values():
            norm = block.get_submodule(path)
            add_hidden(sum(e(norm, n) for n in ("weight", "bias") if getattr(norm, n, None) is not None))
        blocks.append(sum(float(elem(p).double().sum()) for p in block.parameters()))
    for emb in arch.get_embeddings(model):
        add_hidden(elem(emb.weight).double().sum(0))
    norm = arch.get_final_norm(model)
    if norm is not None:
        add_hidden(sum(e(norm, n) for n in ("weight", "bias") if getattr(norm, n, None) is not None))
    head = arch.get_head(model)
    if head is not None and head.weight is not arch.get_embeddings(model)[0].weight:
        add_hidden(e(head).sum(0))
    out.hidden = hidden
    out.blocks = torch.tensor(blocks, dtype=torch.float64)
    return out


def magnitude(model: nn.Module, norm: str = "l2") -> Scores:
    """L2 (or L1) norm of each unit's group of weights."""
    if norm not in ("l1", "l2"):
        raise SecateurError(f"unknown norm '{norm}'; valid norms: l1, l2")
    with torch.no_grad():
        if norm == "l1":
            scores = group_sums(model, lambda p: p.detach().abs())
        else:
            scores = group_sums(model, lambda p: p.detach().double() ** 2)
            scores = _map(scores, torch.sqrt)
    scores.method = f"magnitude-{norm}"
    return scores


def _map(scores: Scores, fn: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
    return Scores(scores.method, {k: fn(v) for k, v in scores.heads.items()},
                  {k: fn(v) for k, v in scores.kv_heads.items()}, {k: fn(v) for k, v in scores.mlp.items()},
                  fn(scores.hidden) if scores.hidden is not None else None,
                  fn(scores.blocks) if scores.blocks is not None else None)


# --- calibration-based scores ------------------------------------------------------------------
def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def _encoder_call(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state


def taylor(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, seed: int = 0) -> Scores:
    """Σ over batches and over each group of |∂L/∂w · w| (see the module doc for L)."""
    from ..models.arch import arch_of

    kind = arch_of(model).kind
    params = [p for p in model.parameters()]
    acc = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is used
    generator = torch.Generator().manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in track(_batches(ids, batch_size), "taylor scores (batch)"):
            model.zero_grad(set_to_none=True)
            if kind == "causal":
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            else:
                pooled = _encoder_call(model, batch).mean(1)
                r = torch.randn(pooled.shape, generator=generator, dtype=torch.float32).to(pooled)
                loss = (pooled * (r / r.norm(dim=-1, keepdim=True))).sum()
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        acc[id(p)] += (p.grad.float() * p.detach().float()).abs()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    scores = group_sums(model, lambda p: acc[id(p)])
    scores.method = "taylor"
    return scores


class _ActivationObserver:
    """Σ over tokens of |x_j| per input column, or of ||x_head||₂ per head (``head_dim``)."""

    def __init__(self, columns: int, head_dim: int | None = None):
        self.head_dim = head_dim
        self.sums = torch.zeros(columns // head_dim if head_dim else columns, dtype=torch.float64)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.head_dim:
            v = x.reshape(x.shape[0], -1, self.head_dim).norm(dim=-1).sum(0)
        else:
            v = x.abs().sum(0)
        self.sums += v.double()
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        from ..calibrate import all_reduce_, reduce_count

        all_reduce_(self.sums)
        self.tokens = reduce_count(self.tokens)

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / max(self.tokens, 1)


class _Collector:
    """The calibration loop's view of scoring: observers on the modules that carry each unit's
    activation, and (with ``influence``) every block's input and output."""

    def __init__(self, roles: dict[str, tuple[int, str]], d: int, influence: bool):
        self.roles, self.d = roles, d
        self.means: dict[tuple[int, str], torch.Tensor] = {}
        self.cos: dict[int, list[float]] = {}
        if influence:
            self.block_io = self._block_io

    def observer(self, name: str, module: nn.Module) -> _ActivationObserver:
        from ..models.structure import in_features

        return _ActivationObserver(in_features(module), self.d if self.roles[name][1] == "heads" else None)

    def compress(self, name: str, module: nn.Module, stat: _ActivationObserver, block: int) -> dict[str, Any]:
        self.means[self.roles[name]] = stat.mean
        return {}

    def _block_io(self, block: int, x: torch.Tensor, out: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]),
                                                    out.float().reshape(-1, out.shape[-1]), dim=-1)
        total = self.cos.setdefault(block, [0.0, 0.0])
        total[0] += float(cos.double().sum())
        total[1] += cos.numel()


def _observe(model: nn.Module, ids: torch.Tensor, activations: bool, influence: bool, batch_size: int,
             compute_dtype: str | None) -> _Collector:
    from ..models.arch import arch_of

    arch = arch_of(model).arch
    blocks = arch.get_blocks(model)
    prefix = arch.block_prefix(model)
    targets: dict[str, nn.Module] = {}
    roles: dict[str, tuple[int, str]] = {}
    if activations:
        reads = [arch.attn.get("qkv") or arch.attn["q"], arch.mlp.get("gate") or arch.mlp["up"]]
        for i, block in enumerate(blocks):
            for path, role in [(arch.attn["o"], "heads"), (arch.mlp["down"], "mlp")] + [(p, "hidden") for p in reads]:
                name = f"{prefix}.{i}.{path}"
                targets[name] = block.get_submodule(path)
                roles[name] = (i, role if role != "hidden" else f"hidden:{path}")
    collector = _Collector(roles, head_dim(model), influence)
    options = Options(propagate="dense", batch_size=batch_size, record_error=False, compute_dtype=compute_dtype)
    sequential(model, ids, targets, collector, options, description="importance")
    return collector


def activation(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, compute_dtype: str | None = None) -> Scores:
    """Minitron's activation scores from one observation pass of the calibration loop."""
    from ..models.arch import arch_of

    arch = arch_of(model).arch
    d = head_dim(model)
    collector = _observe(model, ids, activations=True, influence=False, batch_size=batch_size,
                         compute_dtype=compute_dtype)
    scores = Scores("activation")
    hidden = None
    for (i, role), mean in sorted(collector.means.items()):
        if role == "heads":
            scores.heads[i] = mean
            shape = block_shape(arch.get_blocks(model)[i], arch, d)
            scores.kv_heads[i] = mean.reshape(shape.kv_heads, shape.groups).sum(1)
        elif role == "mlp":
            scores.mlp[i] = mean
        else:
            hidden = mean.clone() if hidden is None else hidden + mean
    scores.hidden = hidden
    return scores


def influence(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, compute_dtype: str | None = None) -> torch.Tensor:
    """ShortGPT block influence 1 − cos(input, output), per block."""
    collector = _observe(model, ids, activations=False, influence=True, batch_size=batch_size,
                         compute_dtype=compute_dtype)
    return torch.tensor([1.0 - s / max(n, 1) for _, (s, n) in sorted(collector.cos.items())], dtype=torch.float64)


# --- measured loss -----------------------------------------------------------------------------
def _skip(block: nn.Module) -> Any:
    """Make ``block`` return its input unchanged (a forward hook; remove the handle to undo)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    return block.register_forward_hook(hook, with_kwargs=True)


def single_skip_losses(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The measured loss of skipping each block alone (higher = more important)."""
    from ..models.arch import arch_of

    facts = arch_of(model)
    batches = _batches(ids, batch_size)
    dense, reference = calibration_loss(model, batches, facts.kind)
    values = []
    for block in track(list(facts.arch.get_blocks(model)), "measured-loss scores (block)"):
        handle = _skip(block)
        try:
            values.append(calibration_loss(model, batches, facts.kind, reference)[0] -
                          (dense if facts.kind == "causal" else 0.0))
        finally:
            handle.remove()
    return torch.tensor(values, dtype=torch.float64)


def width_scores(model: nn.Module, method: str, ids: torch.Tensor | None = None, *, norm: str = "l2",
                 batch_size: int = 8, compute_dtype: str | None = None) -> Scores:
    """Scores of heads, KV heads, MLP channels and hidden channels by ``method``."""
    if method not in WIDTH:
        raise SecateurError(f"unknown importance '{method}'; valid: {one_of(WIDTH)}")
    if method == "magnitude":
        return magnitude(model, norm)
    if ids is None:
        raise SecateurError(f"importance '{method}' needs calibration data (--data / data: in the recipe); "
                            "'magnitude' does not")
    if method == "activation":
        return activation(model, ids, batch_size, compute_dtype)
    return taylor(model, ids, batch_size)


def depth_scores(model: nn.Module, method: str, ids: torch.Tensor | None = None, *, batch_size: int = 8,
                 compute_dtype: str | None = None) -> torch.Tensor:
    """One score per block by ``method`` (higher = more important)."""
    if method not in DEPTH:
        raise SecateurError(f"unknown depth importance '{method}'; valid: {one_of(DEPTH)}")
    if method == "magnitude":
        return magnitude(model).blocks
    if ids is None:
        raise SecateurError(f"depth importance '{method}' needs calibration data (--data / data: in the recipe)")
    if method == "influence":
        return influence(model, ids, batch_size, compute_dtype)
    if method == "loss":
        return single_skip_losses(model, ids, batch_size)
    return taylor(model, ids, batch_size).blocks
