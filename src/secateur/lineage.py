"""A model's lineage: where it came from and every step applied to it, as typed records.

    lineage.of(model).base            # Base(name, path, weights_sha256, model_type, origin)
    lineage.of(model).steps           # [Step(config, seconds, data_fingerprint, result), ...]

``secateur.load`` starts a lineage (the base model and its hash; for an artifact, the lineage its
card recorded), ``compress_`` appends a :class:`Step` per applied step, and ``secateur.save``
writes it into the compression card (``base_model`` and ``history``), from which ``load`` reads it
back — the registry is built on this record.

The record travels with the model object as one typed value (a deep copy of the model copies it);
only this module reads or writes it. Ground floor: imports nothing of ours.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

_ATTR = "_secateur_lineage"


@dataclass(frozen=True)
class Base:
    """The model a lineage starts from: a checkpoint by name and path, with the sha256 of its
    weight files; ``origin`` is the base an artifact itself was made from (its card's base)."""

    name: Optional[str] = None
    path: Optional[str] = None
    weights_sha256: Optional[str] = None
    model_type: Optional[str] = None
    artifact: bool = False
    origin: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path, "weights_sha256": self.weights_sha256,
                               "model_type": self.model_type}
        if self.artifact:
            out.update(is_artifact=True, origin=self.origin)
        return out

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> Optional["Base"]:
        if not d:
            return None
        return cls(d.get("name"), d.get("path"), d.get("weights_sha256"), d.get("model_type"),
                   bool(d.get("is_artifact")), d.get("origin"))


@dataclass(frozen=True)
class Step:
    """One applied step: its resolved config (``{"method": ..., fields...}``), wall seconds, the
    fingerprint of the data it read (None for data-free steps) and what the method reported."""

    config: dict[str, Any]
    seconds: float = 0.0
    data_fingerprint: Any = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Optional[str]:
        return self.config.get("method")

    def to_dict(self) -> dict[str, Any]:  # the card's ``history`` entry
        return {"step": self.config, "seconds": self.seconds, "data_fingerprint": self.data_fingerprint,
                "result": self.result}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Step":
        return cls(dict(d.get("step") or {}), float(d.get("seconds") or 0.0), d.get("data_fingerprint"),
                   dict(d.get("result") or {}))


@dataclass
class Lineage:
    base: Optional[Base] = None
    steps: list[Step] = field(default_factory=list)
    parent: Optional["Lineage"] = None  # an artifact's own lineage, read back from its card by load

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> "Lineage":
        """The lineage an artifact's card recorded (its base and its steps)."""
        return cls(Base.from_dict(card.get("base_model")), [Step.from_dict(h) for h in card.get("history") or []])

    def add(self, step: Step) -> None:
        self.steps.append(step)

    def data_fingerprints(self) -> list[Any]:
        """Each distinct data fingerprint, in first-use order."""
        out: list[Any] = []
        for step in self.steps:
            if step.data_fingerprint is not None and step.data_fingerprint not in out:
                out.append(step.data_fingerprint)
        return out

    def history(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.steps]

    def __deepcopy__(self, memo: dict) -> "Lineage":
        return Lineage(self.base, [copy.deepcopy(s, memo) for s in self.steps], copy.deepcopy(self.parent, memo))


def of(model: Any) -> Lineage:
    """``model``'s lineage, to add steps to (an empty one is started for a model built in memory)."""
    record = model.__dict__.get(_ATTR)
    if record is None:
        record = Lineage()
        set_(model, record)
    return record


def read(model: Any) -> Lineage:
    """``model``'s lineage for reading only: a model without one is left untouched (an empty record
    is returned, not attached), so that measuring or saving a model never changes it."""
    record = model.__dict__.get(_ATTR)
    return record if record is not None else Lineage()


def set_(model: Any, record: Optional[Lineage]) -> None:
    """Give ``model`` this lineage (None: forget it, e.g. a fresh student that copies no weights)."""
    if record is None:
        model.__dict__.pop(_ATTR, None)
    else:
        model.__dict__[_ATTR] = record  # past nn.Module.__setattr__: a plain value, not a submodule


def base_hash(model: Any) -> Optional[str]:
    """The sha256 of the weights the model was loaded from (None for a model built in memory)."""
    base = read(model).base
    return base.weights_sha256 if base is not None else None


__all__ = ["Base", "Step", "Lineage", "of", "read", "set_", "base_hash"]
