"""``secateur registry ...``: the registry's commands (argument parsing only; each calls one
:class:`~secateur.registry.Registry` method). Registered on the main app by ``secateur.cli``;
errors are :class:`~secateur.errors.SecateurError` lines, printed by the main app with exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from .db import RegistryError

registry_app = typer.Typer(no_args_is_help=True, help="Variants, lineage, evaluations and aliases "
                           "(SQLite under SECATEUR_HOME; refs: FAMILY@ALIAS, FAMILY/NAME, v-<id>).")

_out = Console(width=None if sys.stdout.isatty() else 150)
_state: dict[str, Any] = {"home": None}

JSON = typer.Option(False, "--json", help="Machine-readable output.")


@registry_app.callback()
def _root(home: Optional[Path] = typer.Option(None, "--home", help="Registry home folder (default: the "
                                               "SECATEUR_HOME setting, else ~/.local/share/secateur).")) -> None:
    """Variants, lineage, evaluations and aliases."""
    _state["home"] = home


def _open() -> Any:
    from .registry import Registry

    return Registry(_state["home"])


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _print(table: Any) -> None:
    for column in getattr(table, "columns", []):
        column.overflow = "fold"
    _out.print(table)


def _mb(value: Any) -> str:
    return "—" if value is None else f"{value / 1e6:.2f} MB"


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _family_alias(text: str) -> tuple[str, str]:
    if text.count("@") != 1 or not all(text.split("@")):
        raise RegistryError(f"'{text}' is not FAMILY@ALIAS (for example stories@fast)")
    family, alias = text.split("@")
    return family, alias


@registry_app.command("list")
def list_cmd(family: Optional[str] = typer.Argument(None, help="Only this family."), as_json: bool = JSON) -> None:
    """The variants (of FAMILY), oldest first, with their aliases."""
    with _open() as reg:
        variants = reg.list(family)
        aliases: dict[str, list[str]] = {}
        for a in reg.aliases(family):
            aliases.setdefault(a.variant_id, []).append(a.ref)
    if as_json:
        _json([{**v.to_dict(), "aliases": aliases.get(v.id, [])} for v in variants])
        return
    table = Table("id", "ref", "aliases", "status", "steps", "parameters", "bytes", "parent", "created",
                  title=f"{len(variants)} variants" + (f" of {family}" if family else ""))
    for v in variants:
        head = v.headline()
        table.add_row(v.id, v.ref, ", ".join(aliases.get(v.id, [])) or "—", v.status,
                      " → ".join(s for s in head["steps"] if s) or "—", _num(v.parameters), _mb(v.bytes),
                      v.parent_id or "—", v.created)
    _print(table)


@registry_app.command("show")
def show_cmd(ref: str = typer.Argument(..., help="FAMILY@ALIAS, FAMILY/NAME or a variant id."),
             as_json: bool = JSON) -> None:
    """One variant: its headline numbers, card summary, evaluations and where its files are."""
    with _open() as reg:
        v = reg.resolve(ref)
        evaluations = reg.evaluations(v)
        aliases = [a.ref for a in reg.aliases(v.family) if a.variant_id == v.id]
    if as_json:
        _json({**v.to_dict(card=True), "aliases": aliases, "evaluations": [e.to_dict() for e in evaluations]})
        return
    table = Table("field", "value", title=f"{v.ref} ({v.id})")
    for key, value in {**v.headline(), "aliases": ", ".join(aliases) or "—", "parent": v.parent_id or "—",
                       "weights_sha256": v.weights_sha256, "path": str(v.path), "run": v.run_id or "—"}.items():
        table.add_row(key, " → ".join(map(str, value)) if isinstance(value, list) else _num(value))
    _print(table)
    if evaluations:
        from ..evaluate.results import results_table

        _print(results_table([e.to_result() for e in evaluations], title="evaluations",
                             labels=[e.at for e in evaluations]))


def _steps(steps: list[dict[str, Any]]) -> str:
    names = []
    for entry in steps:
        step = entry.get("step") or {}
        detail = step.get("sparsity") if step.get("sparsity") is not None else step.get("bits")
        names.append(f"{step.get('method')}" + (f" {detail}" if detail is not None else ""))
    return " → ".join(names)


@registry_app.command("lineage")
def lineage_cmd(ref: str = typer.Argument(..., help="FAMILY@ALIAS, FAMILY/NAME or a variant id."),
                as_json: bool = JSON) -> None:
    """The lineage tree REF belongs to: its root, the steps on each edge, every descendant."""
    with _open() as reg:
        root = reg.lineage(ref)
        aliases: dict[str, list[str]] = {}
        for a in reg.aliases():
            aliases.setdefault(a.variant_id, []).append(a.ref)
    if as_json:
        _json(root.to_dict())
        return

    def label(node: Any) -> str:
        if node.variant is None:
            return f"[dim]base[/dim] {node.label} [dim]{(node.weights_sha256 or '')[:12]}[/dim]"
        v = node.variant
        text = f"{'[bold]' if node.target else ''}{v.ref}{'[/bold] ◀' if node.target else ''} [dim]{v.id}[/dim]"
        if node.steps:
            text += f"  [cyan]{_steps(node.steps)}[/cyan]"
        if aliases.get(v.id):
            text += f"  [green]{', '.join(aliases[v.id])}[/green]"
        if v.status != "admitted":
            text += f"  [red]{v.status}[/red]"
        return text

    def grow(tree: Tree, node: Any) -> None:
        for child in node.children:
            grow(tree.add(label(child)), child)

    tree = Tree(label(root))
    grow(tree, root)
    _out.print(tree)


@registry_app.command("compare")
def compare_cmd(refs: List[str] = typer.Argument(..., help="Two or more refs."), as_json: bool = JSON) -> None:
    """A table of the variants' headline numbers and latest evaluations, side by side."""
    from ..evaluate.results import format_value

    with _open() as reg:
        rows = reg.compare(refs)
    if as_json:
        _json([r.to_dict() for r in rows])
        return
    table = Table("", *[f"{r.variant.ref}\n{r.variant.id}" for r in rows], title="compare")
    fields = (("status", str), ("model_type", str), ("steps", lambda s: " → ".join(x for x in s if x) or "—"),
              ("parameters", _num), ("sparsity", _num), ("weights_bytes", _mb), ("bytes", _mb),
              ("storage", str), ("base_model", str))
    for key, fmt in fields:
        table.add_row(key, *[fmt(r.headline.get(key)) if r.headline.get(key) is not None else "—" for r in rows])
    metrics: list[tuple] = []
    for r in rows:
        for e in r.evaluations:
            if (e.task, e.metric, e.protocol) not in metrics:
                metrics.append((e.task, e.metric, e.protocol))
    for task, metric, protocol in metrics:
        cells = []
        for r in rows:
            found = [e for e in r.evaluations if (e.task, e.metric, e.protocol) == (task, metric, protocol)]
            cells.append(format_value(found[0].value) if found and found[0].value is not None else "—")
        name = f"{task} {metric}" if metric != task else task
        table.add_row(f"[bold]{name}[/bold] ({protocol or 'no protocol'})", *cells)
    _print(table)


@registry_app.command("alias")
def alias_cmd(alias: str = typer.Argument(..., metavar="FAMILY@NAME", help="The alias to set, e.g. stories@fast."),
              ref: str = typer.Argument(..., help="The variant it names: FAMILY/NAME or a variant id."),
              as_json: bool = JSON) -> None:
    """Point FAMILY@NAME at a variant (the move is kept; `rollback` undoes it)."""
    family, name = _family_alias(alias)
    with _open() as reg:
        move = reg.set_alias(family, name, ref)
    if as_json:
        _json(move.to_dict())
    else:
        _out.print(f"{family}@{name} → {move.variant_id}" + (f" (was {move.previous_id})" if move.previous_id else ""))


@registry_app.command("rollback")
def rollback_cmd(alias: str = typer.Argument(..., metavar="FAMILY@NAME", help="The alias to move back."),
                 as_json: bool = JSON) -> None:
    """Move FAMILY@NAME back to its previous target."""
    family, name = _family_alias(alias)
    with _open() as reg:
        move = reg.rollback(family, name)
    if as_json:
        _json(move.to_dict())
    else:
        _out.print(f"{family}@{name} → {move.variant_id} (rolled back from {move.previous_id})")


@registry_app.command("add")
def add_cmd(directory: Path = typer.Argument(..., metavar="DIR", help="An artifact or any HF / llm-compressor "
                                             "checkpoint directory."),
            family: str = typer.Option(..., "--family", "-f", help="The family it joins (created on first use)."),
            name: Optional[str] = typer.Option(None, "--name", "-n", help="Its name in the family (default: the "
                                               "directory's name)."),
            parent: Optional[str] = typer.Option(None, "--parent", help="The variant it was made from (default: "
                                                 "the one its card's base model names, if registered)."),
            as_json: bool = JSON) -> None:
    """Copy DIR into the store (once per content) and record it as a variant of FAMILY."""
    with _open() as reg:
        v = reg.add(directory, family, name=name, parent=parent)
    if as_json:
        _json(v.to_dict())
    else:
        _out.print(f"{v.id} {v.ref} ({_mb(v.bytes)}" + (f", from {v.parent_id}" if v.parent_id else "") + ")")


@registry_app.command("rm")
def rm_cmd(ref: str = typer.Argument(..., help="FAMILY/NAME, a variant id or FAMILY@ALIAS."),
           force: bool = typer.Option(False, "--force", help="Also drop the aliases that name it."),
           as_json: bool = JSON) -> None:
    """Remove a variant's rows (its files stay in the store until `gc`)."""
    with _open() as reg:
        v = reg.remove(ref, force=force)
    if as_json:
        _json(v.to_dict())
    else:
        _out.print(f"removed {v.id} ({v.ref}); `secateur registry gc` frees its files")


@registry_app.command("gc")
def gc_cmd(as_json: bool = JSON) -> None:
    """Delete stored objects no variant references, and leftovers of interrupted copies."""
    with _open() as reg:
        report = reg.gc()
    if as_json:
        _json(report.to_dict())
    else:
        _out.print(f"removed {len(report.removed)} objects ({_mb(report.freed_bytes)}) and {report.temporaries} "
                   f"leftovers; {report.kept} objects in use")


@registry_app.command("mirror")
def mirror_cmd(family: Optional[str] = typer.Argument(None, help="Only this family."),
               uri: Optional[str] = typer.Option(None, "--uri", help="MLflow tracking URI (default: the "
                                                 "SECATEUR_MLFLOW_URI setting), e.g. sqlite:///mlflow.db."),
               weights: bool = typer.Option(False, "--weights", help="Log the weights too (default: the card)."),
               as_json: bool = JSON) -> None:
    """Mirror the registry into MLflow: a run per variant, a model version per admitted one, the aliases
    (extra `mlflow`; idempotent: logs only what MLflow lacks)."""
    from ..settings import mlflow_uri
    from .mirror import MlflowMirror

    target = uri or mlflow_uri()
    if not target:
        raise RegistryError("no MLflow tracking URI: pass --uri (e.g. sqlite:///mlflow.db) or set SECATEUR_MLFLOW_URI")
    with _open() as reg:
        summary = MlflowMirror(target, weights=weights).sync(reg, family)
    if as_json:
        _json(summary)
    else:
        _out.print(f"mirrored {summary['runs']} variants of {summary['families']} families into {target} "
                   f"({summary['evaluations_logged']} new evaluations)")


__all__ = ["registry_app"]
