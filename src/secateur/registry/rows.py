"""The registry's rows as typed, frozen dataclasses (read from SQLite columns and JSON text; never
pickled). ``to_dict()`` gives the JSON the CLI prints with ``--json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Variant:
    """One registered model: its card (None for a checkpoint without one), what the store measured,
    and where its files are (``path``: ``objects/<store_key>`` under the registry's home)."""

    id: str
    family: str
    name: str
    status: str  # "admitted" | "rejected"
    weights_sha256: str
    bytes: int
    parameters: Optional[int]
    model_type: Optional[str]
    store_key: str
    path: Path
    created: str
    card: Optional[dict[str, Any]] = None
    info: dict[str, Any] = field(default_factory=dict)
    run_id: Optional[str] = None
    parent_id: Optional[str] = None

    @property
    def ref(self) -> str:
        """``family/name``: the ref that names this variant for as long as it is registered."""
        return f"{self.family}/{self.name}"

    def headline(self) -> dict[str, Any]:
        """The numbers a table shows: the card's summary when there is a card, else what the store
        knows (bytes, parameters, the checkpoint's quantization format)."""
        if self.card is not None:
            from ..artifacts.card import card_summary

            summary = card_summary(self.card)
        else:
            quant = (self.info.get("config") or {}).get("quantization") or {}
            summary = {"base_model": None, "model_type": self.model_type, "steps": [],
                       "parameters": self.parameters, "sparsity": None, "weights_bytes": self.info.get("weights_bytes"),
                       "storage": " ".join(str(v) for v in quant.values() if v) or "dense", "seconds": None}
        return {"id": self.id, "ref": self.ref, "status": self.status, "model_type": summary.get("model_type"),
                "steps": summary.get("steps") or [], "parameters": summary.get("parameters") or self.parameters,
                "sparsity": summary.get("sparsity"), "weights_bytes": summary.get("weights_bytes"),
                "bytes": self.bytes, "storage": summary.get("storage"), "base_model": summary.get("base_model"),
                "created": self.created}

    def to_dict(self, card: bool = False) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["ref"] = self.ref
        if not card:
            out.pop("card")
        return out


@dataclass(frozen=True)
class Evaluation:
    """One recorded number with its protocol, every setting behind it, its data and its machine."""

    id: int
    variant_id: str
    task: str
    metric: str
    protocol: Optional[str]
    value: Optional[float]
    extra: dict[str, Any]
    settings: dict[str, Any]
    data_fingerprint: Optional[str]
    machine: Optional[dict[str, Any]]
    run_id: Optional[str]
    at: str

    def to_result(self) -> Any:
        from ..evaluate.results import EvalResult

        return EvalResult(self.task, self.protocol, self.metric, self.value, dict(self.extra), dict(self.settings))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Alias:
    family: str
    name: str
    variant_id: str
    updated: str

    @property
    def ref(self) -> str:
        return f"{self.family}@{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ref": self.ref}


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: ``set`` (to ``variant_id`` from ``previous_id``), ``rollback`` (back to
    ``variant_id``), or ``drop``; ``undone`` marks a ``set`` that a rollback took back."""

    id: int
    family: str
    alias: str
    action: str
    variant_id: Optional[str]
    previous_id: Optional[str]
    undone: bool
    at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Run:
    """A pipeline run: its status, per-stage timings and gate verdicts."""

    id: str
    pipeline: str
    status: str  # running | succeeded | failed | interrupted
    started: str
    finished: Optional[str]
    timings: dict[str, Any]
    verdicts: list[Any]
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LineageNode:
    """A node of a lineage tree: a registered variant, or (``variant`` None) a base model the
    registry only knows by the name and weights hash its children's cards recorded. ``steps`` are
    the steps that made this node from its parent."""

    label: str
    variant: Optional[Variant] = None
    weights_sha256: Optional[str] = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    children: list["LineageNode"] = field(default_factory=list)
    target: bool = False  # the node the lineage was asked for

    def walk(self) -> list["LineageNode"]:
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "variant": self.variant.id if self.variant else None,
                "status": self.variant.status if self.variant else None, "weights_sha256": self.weights_sha256,
                "steps": self.steps, "target": self.target, "children": [c.to_dict() for c in self.children]}


@dataclass(frozen=True)
class Compared:
    """One column of a comparison: the variant, its headline numbers and its latest evaluation per
    (task, metric, protocol)."""

    variant: Variant
    headline: dict[str, Any]
    evaluations: list[Evaluation]

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant.id, "ref": self.variant.ref, "headline": self.headline,
                "evaluations": [e.to_dict() for e in self.evaluations]}


@dataclass(frozen=True)
class GcReport:
    removed: list[str]  # store keys deleted
    freed_bytes: int
    temporaries: int  # leftovers of killed copies removed
    kept: int  # objects still referenced

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["Variant", "Evaluation", "Alias", "AliasMove", "Run", "LineageNode", "Compared", "GcReport"]
