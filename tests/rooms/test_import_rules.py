"""The import rules of ../shared/ARCHITECTURE.md, checked on the package's real import graph
(every ``import`` and ``from ... import`` in the source, lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "secateur"
GROUND = {"errors", "settings", "config", "_version", "lineage"}
MACHINERY = {"api", "targets", "calibrate", "progress", "recipe"}
METHOD_ROOMS = {"prune", "quant", "distill"}
# testing.py (tiny models, the in-process CLI runner) serves the tests only: nothing in src imports it,
# and it may drive the whole package, the CLI included
PRODUCT = {"pipeline", "planner", "cli", "demo", "__init__", "testing", "serve"}


def room(module: str) -> str:
    """secateur.quant.gptq -> quant; secateur.api -> api."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = ".".join(parts[:-1])
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.startswith("secateur"):
                    for alias in node.names:  # `from . import gptq` imports the module secateur.quant.gptq
                        sub = f"{mod}.{alias.name}"
                        candidate = SRC.parent / Path(*sub.split("."))
                        targets.add(sub if candidate.with_suffix(".py").exists() or candidate.is_dir() else mod)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("secateur"))
        edges[module] = {t for t in targets if t != module}
    return edges


def violations(rule, edges):
    return sorted(f"{src} -> {dst}" for src, dsts in edges.items() for dst in dsts if not rule(src, dst))


def test_the_ground_floor_imports_only_itself():
    assert violations(lambda s, d: room(s) not in GROUND or room(d) in GROUND, graph()) == []


def test_models_and_data_import_only_the_ground_floor():
    ok = lambda s, d: room(s) not in ("models", "data") or room(d) in GROUND | {room(s), "progress"}  # noqa: E731
    assert violations(ok, graph()) == []


def test_the_runtime_imports_only_models_and_the_ground_floor():
    ok = lambda s, d: room(s) != "runtime" or room(d) in GROUND | {"runtime", "models"}  # noqa: E731
    assert violations(ok, graph()) == []


def test_artifacts_import_no_method_and_no_product_room():
    ok = lambda s, d: room(s) != "artifacts" or room(d) in GROUND | {"artifacts", "models", "runtime", "settings"}  # noqa: E731
    assert violations(ok, graph()) == []


def test_evaluation_never_imports_methods_artifacts_or_product_rooms():
    allowed = GROUND | {"evaluate", "models", "data", "runtime", "progress"}
    assert violations(lambda s, d: room(s) != "evaluate" or room(d) in allowed, graph()) == []


def test_methods_stand_on_the_machinery_and_never_on_each_other_or_the_product():
    allowed = GROUND | MACHINERY | {"models", "data", "runtime"}

    def ok(s: str, d: str) -> bool:
        if room(s) not in METHOD_ROOMS:
            return True
        if room(d) in allowed:
            return True
        return room(d) in METHOD_ROOMS and not _method_file(d)

    assert violations(ok, graph()) == []


def _method_file(module: str) -> bool:
    """A file that registers a method (not a room's shared primitives)."""
    path = SRC.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return path.exists() and "@register(" in path.read_text(encoding="utf-8")


def test_no_circles_between_rooms():
    edges = graph()
    rooms: dict[str, set[str]] = {}
    for s, ds in edges.items():
        for d in ds:
            if room(s) != room(d) and room(s) not in PRODUCT and room(d) not in PRODUCT:
                rooms.setdefault(room(s), set()).add(room(d))
    # the shared machinery and the method table meet the methods in both directions by design:
    # api.methods() imports the method files that register themselves (the one table)
    cycles = []
    for a, ds in rooms.items():
        for b in ds:
            if a in rooms.get(b, set()) and {a, b} & (GROUND | {"models", "runtime", "artifacts", "evaluate", "data"}):
                cycles.append(f"{a} <-> {b}")
    assert sorted(cycles) == []


def test_the_method_table_holds_each_apply_itself_and_the_exports_derive_from_it():
    """One table: each entry is the method file's own apply (no trampoline by module name), its file
    is named after it, and secateur.<Name>Config is that table's config class."""
    import importlib

    import secateur
    from secateur.api import methods

    table = methods()
    assert len(table) == 14
    for name, spec in table.items():
        module = importlib.import_module(spec.apply.__module__)
        assert module.apply is spec.apply and module.__name__.rsplit(".", 1)[-1] == name
        assert getattr(secateur, spec.config.__name__) is spec.config and spec.config.method == name
    assert {n for n in secateur.__all__ if n.endswith("Config") and n != "StepConfig"} == \
        {s.config.__name__ for s in table.values()}


def test_a_method_room_reads_no_other_method_room():
    """prune/ and quant/ share machinery through calibrate.py and api.py, never each other; the
    training room crosses on purpose to train what the others make: quant's QAT modules (qat,
    distilling a quantized model) and prune's masks (gradual pruning)."""
    allowed = {("distill", "quant"), ("distill", "prune")}
    ok = lambda s, d: (room(s) not in METHOD_ROOMS or room(d) not in METHOD_ROOMS or room(s) == room(d)  # noqa: E731
                       or (room(s), room(d)) in allowed)
    assert violations(ok, graph()) == []


def test_the_shared_machinery_stands_below_the_methods():
    """api, targets, calibrate, recipe and progress import the ground floor, models/, data/ and each
    other; api alone reaches artifacts/ (a training step's teacher named by path is loaded with
    secateur.load) and, through methods(), the method files that register themselves."""
    below = GROUND | MACHINERY | {"models", "data"}

    def ok(s: str, d: str) -> bool:
        if room(s) not in MACHINERY or room(d) in below:
            return True
        return s == "secateur.api" and (room(d) == "artifacts" or room(d) in METHOD_ROOMS)

    assert violations(ok, graph()) == []


def test_the_registry_stands_on_artifacts_and_result_types_never_on_the_pipeline_or_the_cli():
    """registry/ imports the ground floor, models/, artifacts/ (verify, load, the card summary) and
    evaluate's result type; the pipeline and the CLI stand above it; nothing below the product rooms
    imports it (secateur.load reaches it only through the package's lazy export)."""
    allowed = GROUND | {"registry", "models", "artifacts"}
    ok = lambda s, d: room(s) != "registry" or room(d) in allowed or d == "secateur.evaluate.results"  # noqa: E731
    assert violations(ok, graph()) == []
    above = PRODUCT | {"registry", "search", "report", "serve"}
    assert violations(lambda s, d: room(d) != "registry" or room(s) in above, graph()) == []


def test_nothing_in_the_package_imports_its_test_helpers():
    assert violations(lambda s, d: d != "secateur.testing", graph()) == []


def test_the_planner_stands_below_the_pipelines():
    """The pipeline room asks the planner before a run; the planner reads shapes, methods' configs
    and the machinery, never a pipeline (the search room will price candidates with it too)."""
    ok = lambda s, d: room(s) != "planner" or room(d) not in {"pipeline", "cli", "demo", "registry", "report"}  # noqa: E731
    assert violations(ok, graph()) == []


def test_the_gateway_runs_variants_through_the_runtime_and_nothing_below_imports_it():
    """serve/ stands on the registry (names, artifacts' paths), artifacts/ (load), the runtime (how a
    variant runs), models/ and data/ (the offline routing calibration and evaluation read TinyStories'
    calibration and evaluation splits through the one data room, not a reader of their own); never
    the pipeline, evaluation or the methods. Only the CLI imports it."""
    allowed = GROUND | {"serve", "runtime", "artifacts", "registry", "models", "data", "progress"}
    assert violations(lambda s, d: room(s) != "serve" or room(d) in allowed, graph()) == []
    assert violations(lambda s, d: room(d) != "serve" or room(s) in {"serve", "cli"}, graph()) == []
