"""A family as the report draws it, read from the registry: every variant of ``family`` with its
parent, status, aliases, card, evaluations (the latest of each kind), its P4 speed, its gate
verdicts and its per-layer sparsity and bit widths; the points of its searches and its routing
evaluations (``secateur route-eval``), if any. A variant with exit heads needs nothing more: its
exit curve is in its card (the ``early_exit`` step's result) and, once timed, in its speed
evaluation (``exit_curve``)."""

from __future__ import annotations

from typing import Any

from .layers import layer_stats


def collect(registry: Any, family: str) -> dict[str, Any]:
    """The report's input (see :mod:`secateur.report`) for ``family`` in ``registry``."""
    variants = registry.list(family)  # raises, naming the families there are, for an unknown one
    by_id = {v.id: v for v in variants}
    aliases: dict[str, list[str]] = {}
    for alias in registry.aliases(family):
        aliases.setdefault(alias.variant_id, []).append(alias.name)
    base = next((v for v in variants if v.name == "base"), None)
    rows, machine = [], {}
    for v in variants:
        evaluations, speed = [], None
        for e in registry.evaluations(v):          # oldest first: the report keeps the last of each kind
            if e.task == "speed":
                speed = {**e.extra, "settings": e.settings}
                continue
            evaluations.append({"task": e.task, "metric": e.metric, "value": e.value, "protocol": e.protocol,
                                "settings": e.settings, "spec": (e.extra or {}).get("spec") or {}})
            machine = machine or {"cpu": (e.settings.get("machine") or {}).get("cpu"),
                                  "threads": e.settings.get("threads")}
        parent = by_id.get(v.parent_id)
        card = v.card or {}
        row = {"name": v.name, "id": v.id, "status": "base" if v is base else v.status,
               "parent": None if v is base else ("base" if parent is None or parent is base else parent.name),
               "aliases": sorted(aliases.get(v.id, [])), "recipe": card.get("recipe") or {}, "card": card,
               "evaluations": evaluations, "speed": speed,
               "verdicts": (v.info.get("evidence") or {}).get("verdicts") or [], "layers": layer_stats(v.path),
               "created": v.created}
        if v.info.get("weights_bytes") is not None:
            row["bytes"] = v.info["weights_bytes"]
        rows.append(row)
    search = registry.search_points(family) if hasattr(registry, "search_points") else []
    routing = [r.info for r in registry.runs(f"route-eval:{family}") if r.status == "succeeded"]
    return {"family": family, "base": next((r for r in rows if r["status"] == "base"), None), "machine": machine,
            "variants": [r for r in rows if r["status"] != "base"], "search": search, "routing": routing}


__all__ = ["collect"]
