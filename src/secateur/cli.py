"""The ``secateur`` command line. Argument parsing only: every command calls a public function.

Bad input (a missing path, an unknown method, a bad recipe) prints one line and exits with code 2;
an unexpected failure prints one line and exits with code 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SecateurError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make neural networks smaller and measurably faster.")
import_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints from other formats.")
app.add_typer(import_app, name="import")
from .registry.commands import registry_app  # noqa: E402  (secateur registry ...)
app.add_typer(registry_app, name="registry")

STORAGE_HELP = "dense: a plain checkpoint; sparse: bitmask + values for pruned weights (see `secateur export`)."

out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True)


def _emit(data: Any, as_json: bool, table: Any = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        _show(table)


def _show(table: Any) -> None:
    """Print a table whose cells wrap on a narrow terminal rather than lose their ends."""
    for column in getattr(table, "columns", []):
        column.overflow = "fold"
    out.print(table)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"secateur {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Make neural networks smaller and measurably faster."""


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the compression methods: name, kind, what data each needs, paper."""
    from .api import methods

    rows = [{"name": m.name, "kind": m.kind, "needs_data": m.needs_data, "needs": m.needs, "paper": m.paper,
             "config": m.config.__name__} for m in sorted(methods().values(), key=lambda m: (m.kind, m.name))]
    table = Table("method", "kind", "needs", "config", "paper")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["needs"], r["config"], r["paper"])
    _emit(rows, as_json, table)


@app.command("explain")
def explain_cmd(method: str = typer.Argument(..., help="A method name, see `secateur methods`.")) -> None:
    """Print a method's fields, defaults and docs, and an example recipe."""
    from .api import get_method
    from .recipe import example_yaml

    spec = get_method(method)
    out.print(f"[bold]{spec.name}[/bold] ({spec.kind}; needs {spec.needs}) — {spec.paper}")
    doc = (spec.config.__doc__ or "").strip()
    module_doc = (sys.modules[spec.config.__module__].__doc__ or "").strip()
    if module_doc:
        out.print(module_doc)
    elif doc:
        out.print(doc)
    table = Table("field", "type", "default", "valid", "doc")
    for f in spec.config.describe():
        valid = f"[{f['range'][0]}, {f['range'][1]}]" if f["range"] else (", ".join(map(str, f["choices"])) if f["choices"] else "")
        table.add_row(f["name"], f["type"], repr(f["default"]), valid, f["doc"])
    _show(table)
    out.print("Example recipe:")
    out.print(example_yaml(spec), markup=False, highlight=False)


@app.command("eval")
def eval_cmd(model: str = typer.Argument(..., help="Model directory, artifact or hub id."),
             task: str = typer.Option("perplexity", "--task", "-t", help="perplexity | sts | speed"),
             data: Optional[str] = typer.Option(None, "--data", "-d",
                                                help="tinystories (P1), wikitext2 (P3), stsb (P2) or a file path"),
             split: Optional[str] = typer.Option(None, "--split", help="Dataset split (default: the protocol's)."),
             seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Perplexity window length."),
             batch: Optional[int] = typer.Option(None, "--batch", help="Batch size."),
             max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Quick run on the first windows."),
             prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="Speed: prompt tokens."),
             new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="Speed: generated tokens."),
             compile_: bool = typer.Option(False, "--compile",
                                           help="Speed: static KV cache + torch.compile (batch 1, causal LMs)."),
             unfused: bool = typer.Option(False, "--unfused", help="Run a W8A8 encoder module by module "
                                          "(default: fused blocks, the runtime's fastest form; same integers)."),
             output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON result here."),
             as_json: bool = typer.Option(False, "--json", help="Print the JSON result instead of a table.")) -> None:
    """Evaluate a model: perplexity (P1/P3), sentence similarity (P2) or speed and memory (P4)."""
    from .evaluate import evaluate, results_table
    from .registry import load  # paths, hub ids and registry refs
    from .runtime import optimize_

    given = {"split": split, "seq_len": seq_len, "batch": batch, "max_windows": max_windows,
             "prompt_len": prompt_len, "new_tokens": new_tokens, "compile": compile_ or None}
    options = {k: v for k, v in given.items() if v is not None}
    loaded = load(model)
    if not unfused:
        optimize_(loaded.model)
    result = evaluate(loaded.model, loaded.tokenizer, task, data, **options)
    if output is not None:
        output.write_text(result.to_json() + "\n")
    _emit(result.to_dict(), as_json, results_table([result], title=f"{task} — {model}"))


@app.command("info")
def info_cmd(model: Optional[str] = typer.Argument(None, help="Model directory, artifact or hub id."),
             machine: bool = typer.Option(False, "--machine", help="This machine: the CPU, its flags, and the kernel "
                                          "each quantized operation runs, timed beside float32."),
             remeasure: bool = typer.Option(False, "--remeasure", help="--machine: forget this machine's cached "
                                            "kernel choices and measure again."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show a model's architecture facts and, for an artifact, its compression card summary; with
    --machine, what each quantized operation runs on this CPU and how fast beside float32."""
    from .artifacts import card_summary
    from .registry import load  # paths, hub ids and registry refs

    if machine:
        _machine_info(remeasure, as_json)
        return
    if model is None:
        raise SecateurError("info needs a MODEL (a directory, artifact or hub id), or --machine")
    loaded = load(model)
    data = {"arch": loaded.arch.to_dict(), "source": {k: v for k, v in loaded.info.items() if k != "card"}}
    if "card" in loaded.info:
        data["card"] = card_summary(loaded.info["card"])
    table = Table("field", "value", title=str(model))
    for key, value in {**data["arch"], **data.get("card", {})}.items():
        table.add_row(key, str(value))
    _emit(data, as_json, table)


def _machine_info(remeasure: bool, as_json: bool) -> None:
    from .runtime import dispatch
    from .runtime.survey import survey

    if remeasure:
        dispatch.clear()
    data = survey()
    m = data["machine"]
    table = Table("operation", "shape", "tokens", "kernel", "µs", "float32 µs", "× float32", "GOP/s", "candidates (µs)",
                  title=f"{m['cpu']} · {', '.join(m['flags']) or 'no SIMD flags read'} · {m['threads']} threads · "
                        f"torch {m['torch']} · native kernels {'built' if data['native_kernels'] else 'off'}")
    for r in data["rows"]:
        fmt = (lambda v, spec: "—" if v is None else format(v, spec))
        others = ", ".join(f"{k} {v:.0f}" for k, v in r["candidates"].items())
        if r["screened"]:
            others += f"; screened out after one row: {', '.join(r['screened'])}"
        table.add_row(r["op"], "×".join(map(str, r["shape"])), str(r["tokens"]), r["kernel"], fmt(r["us"], ".1f"),
                      fmt(r["fp32_us"], ".1f"), fmt(r["vs_fp32"], ".2f"), fmt(r["gops"], ".0f"), others)
    _emit(data, as_json, table)
    if not as_json:
        out.print(f"cached choices: {data['cache']} (SECATEUR_KERNELS forces one, e.g. w8a8=int_mm; "
                  "decode_attention's × is against sdpa)", markup=False, highlight=False)


@app.command("compress")
def compress_cmd(recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe file (.yaml or .json)."),
                 overrides: List[str] = typer.Option([], "--set", help="Override a field: steps[0].sparsity=0.6"),
                 out_dir: Optional[Path] = typer.Option(None, "--out", help="Write the artifact here."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the modules each step touches."),
                 storage: str = typer.Option("dense", "--storage", help=STORAGE_HELP),
                 nproc: int = typer.Option(1, "--nproc", min=1, max=64,
                                           help="Split calibration over N processes (torch.distributed: gloo on "
                                                "CPU, NCCL on GPUs), the threads divided between them."),
                 stream: bool = typer.Option(False, "--stream",
                                             help="Out of core: read the model block by block from its safetensors "
                                                  "shards and write each compressed block at once (models larger "
                                                  "than memory; gptq, sparsegpt, wanda; needs --out)."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Run a recipe: evaluate, compress, evaluate again, save an artifact with its compression card.

    With --out, calibrated steps checkpoint after every block: re-running the same command after a
    crash continues where it stopped. Under torchrun (or with --nproc N), calibration samples are
    split over the processes and every statistic is summed before a method compresses; rank 0
    evaluates and saves. With --stream, memory holds one block at a time, not the model."""
    from .recipe import Recipe

    recipe = Recipe.load(recipe_path)
    if overrides:
        recipe = recipe.with_overrides(overrides)
    if stream and dry_run:  # the plan of a streamed run: what the recipe touches, and the predicted peak
        _run(recipe, out_dir, True, as_json, storage)
        if not as_json:
            from .planner import Data, gib, plan_recipe

            spec = recipe.data
            est = plan_recipe(str(recipe.model), list(recipe.steps),
                              Data(spec.samples, spec.seq_len) if spec is not None else None, streamed=True)
            parts = ", ".join(f"{k} {gib(v)}" for k, v in sorted(est.memory.items(), key=lambda kv: -kv[1])[:3])
            out.print(f"streamed: predicted peak {gib(est.peak_bytes)} ({parts}), about {est.seconds:.0f} s")
        return
    if stream and not dry_run:
        if nproc > 1 or "WORLD_SIZE" in os.environ:
            raise SecateurError("--stream runs in one process; drop --nproc (or torchrun)")
        from .pipeline.recipe_run import run_streamed

        _report(run_streamed(recipe, out_dir, storage), as_json)
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(nproc, recipe)
        return
    from .calibrate import init_from_env

    rank, size = init_from_env()
    if size > 1:
        _check_distributable(recipe)
    if rank != 0:  # the other ranks calibrate their share and leave the talking and the writing to rank 0
        from .pipeline import run_recipe

        run_recipe(recipe, out=out_dir, storage=storage, evaluate_before=False, evaluate_after=False, write=False)
        return
    _run(recipe, out_dir, dry_run, as_json, storage)


def _check_distributable(recipe: Any) -> None:
    from .api import get_method

    trains = [s.method for s in recipe.steps if get_method(s.method).trains]
    if trains:
        raise SecateurError(f"--nproc: training steps ({', '.join(trains)}) run in one process only (calibration "
                            "is what is split); run this recipe without --nproc")


_ARGS: list[str] = []  # this invocation's arguments (what _relaunch starts again)


def _relaunch(nproc: int, recipe: Any) -> None:
    """Start ``nproc`` copies of this command under torch.distributed's launcher, the CPU threads
    divided between them, and wait; exit with the first failure's code."""
    import subprocess

    import torch

    _check_distributable(recipe)
    args = [a for i, a in enumerate(_ARGS) if not a.startswith("--nproc") and not (i and _ARGS[i - 1] == "--nproc")]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // nproc))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "secateur.cli", *args]
    code = subprocess.run(cmd, env=env).returncode
    if code:
        raise typer.Exit(code)


@app.command("prune")
def prune_cmd(model: str = typer.Argument(..., help="Model directory, artifact or hub id."),
              method: str = typer.Option("magnitude", "--method", "-m", help="A pruning method (see `secateur methods`)."),
              sparsity: float = typer.Option(0.5, "--sparsity", "-s", help="Fraction of weights removed."),
              pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M pattern such as 2:4."),
              scope: Optional[str] = typer.Option(None, "--scope", help="magnitude: row | matrix | global."),
              owl: bool = typer.Option(False, "--owl", help="wanda/sparsegpt: OWL non-uniform layer sparsity."),
              structured: bool = typer.Option(False, "--structured", help="Remove whole heads, MLP channels, "
                                               "blocks, hidden width (method 'structured')."),
              heads: float = typer.Option(0.0, "--heads", help="structured: fraction of attention heads removed."),
              mlp: float = typer.Option(0.0, "--mlp", help="structured: fraction of MLP channels removed."),
              drop_layers: int = typer.Option(0, "--drop-layers", help="structured: number of blocks removed."),
              blocks: Optional[str] = typer.Option(None, "--blocks", help="structured: blocks removed by hand, e.g. 1,2."),
              hidden: float = typer.Option(0.0, "--hidden", help="structured: fraction of hidden channels removed."),
              importance: Optional[str] = typer.Option(None, "--importance",
                                                       help="structured: magnitude | activation | taylor."),
              depth_importance: Optional[str] = typer.Option(None, "--depth-importance",
                                                             help="structured: influence | loss | taylor | magnitude."),
              gqa: Optional[str] = typer.Option(None, "--gqa", help="structured: groups | query."),
              non_uniform: bool = typer.Option(False, "--non-uniform", help="structured: per-block shapes "
                                               "chosen by the scores (not a standard checkpoint)."),
              data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration data (name or path)."),
              samples: int = typer.Option(128, "--samples", help="Calibration sequences."),
              seq_len: int = typer.Option(256, "--seq-len", help="Calibration sequence length."),
              evals: List[str] = typer.Option([], "--eval", help="Evaluate before/after: TASK or TASK:DATA."),
              out_dir: Optional[Path] = typer.Option(None, "--out", help="Write the artifact here."),
              dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the modules touched."),
              storage: str = typer.Option("dense", "--storage", help=STORAGE_HELP),
              as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Prune a model with one method; prints the recipe it ran (the same step works in a recipe file)."""
    if structured:
        step = _structured_step(heads, mlp, drop_layers, blocks, hidden, importance, depth_importance, gqa,
                                non_uniform)
    else:
        step = {"method": method, "sparsity": sparsity}
    if pattern is not None:
        step["pattern"] = pattern
    if scope is not None:
        step["scope"] = scope
    if owl:
        step["owl"] = True
    _run_step(model, step, data, samples, seq_len, evals, out_dir, dry_run, as_json, storage)


@app.command("quantize")
def quantize_cmd(model: str = typer.Argument(..., help="Model directory, artifact or hub id."),
                 method: str = typer.Option("rtn", "--method", "-m", help="A quantization method (see `secateur methods`)."),
                 bits: Optional[int] = typer.Option(None, "--bits", "-b", help="Bits per weight (default: the "
                                                    "method's: 4, smoothquant 8; fp8 has none)."),
                 group_size: Optional[int] = typer.Option(None, "--group-size", "-g",
                                                          help="Input columns per scale (default: per channel)."),
                 activations: Optional[str] = typer.Option(None, "--activations", help="int8: W8A8, dynamic per-token "
                                                           "int8 activations (smoothquant's default); none: weights "
                                                           "only (the default of the others; fp8: fp8 or none)."),
                 asymmetric: bool = typer.Option(False, "--asymmetric", help="Integer zero points."),
                 observer: Optional[str] = typer.Option(None, "--observer", help="minmax | mse."),
                 no_fallback: bool = typer.Option(False, "--no-fallback", help="Fail where the group size does "
                                                  "not divide a layer (default: per-channel there)."),
                 data: Optional[str] = typer.Option(None, "--data", "-d", help="Calibration data (name or path)."),
                 samples: int = typer.Option(128, "--samples", help="Calibration sequences."),
                 seq_len: int = typer.Option(256, "--seq-len", help="Calibration sequence length."),
                 evals: List[str] = typer.Option([], "--eval", help="Evaluate before/after: TASK or TASK:DATA."),
                 out_dir: Optional[Path] = typer.Option(None, "--out", help="Write the artifact here."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the modules touched."),
                 as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Quantize a model with one method; prints the recipe it ran (the same step works in a recipe file).
    Every option left out keeps the method's own default (`secateur explain METHOD`)."""
    import dataclasses

    from .api import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).config)}
    asked = {"bits": bits, "activations": None if activations in (None, "none") else activations,
             "symmetric": False if asymmetric else None, "observer": observer, "fallback": False if no_fallback else None}
    if group_size is not None:
        asked.update(strategy="group", group_size=group_size)
    elif "strategy" in fields and "group_size" in fields:
        asked["strategy"] = "channel"  # the CLI's documented default: per channel
    step: dict[str, Any] = {"method": method}
    for key, value in asked.items():
        if value is None:
            continue
        if key not in fields:  # an option this method has no field for: one line naming what it has
            option = {"group_size": "--group-size", "strategy": "--group-size", "symmetric": "--asymmetric",
                      "fallback": "--no-fallback"}.get(key, "--" + key)
            raise SecateurError(f"quantize --method {method} takes no {option} (its fields: "
                                f"{', '.join(sorted(fields - {'targets', 'ignore', 'overrides'}))})")
        step[key] = value
    if activations == "none" and "activations" in fields:
        step["activations"] = None
    _run_step(model, step, data, samples, seq_len, evals, out_dir, dry_run, as_json)


@app.command("distill")
def distill_cmd(student: str = typer.Argument(..., help="Student: a model directory, artifact or hub id (with "
                                                       "--keep-layers/--drop-layers: the model to cut it from)."),
                teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher model (default: the "
                                                      "STUDENT model as loaded, before --keep-layers/--drop-layers)."),
                data: str = typer.Option(..., "--data", "-d", help="Training text, comma-separated: dataset[:split] "
                                         "or files, e.g. stsb:train,wikitext2:validation,c4."),
                keep_layers: Optional[str] = typer.Option(None, "--keep-layers", help="Student = these blocks of "
                                                          "STUDENT, e.g. 0,4,5."),
                drop_layers: int = typer.Option(0, "--drop-layers", help="Student = STUDENT without this many blocks, "
                                                "chosen by block influence on the first data source."),
                fresh: Optional[str] = typer.Option(None, "--fresh", help="Student = a new, randomly initialised model "
                                                    "with STUDENT's config changed, e.g. num_hidden_layers=2,"
                                                    "hidden_size=256 (teacher: STUDENT unless --teacher)."),
                steps: int = typer.Option(500, "--steps", help="Optimizer steps."),
                lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
                batch_size: int = typer.Option(16, "--batch-size", help="Sequences per step."),
                seq_len: int = typer.Option(256, "--seq-len", help="Tokens per window (causal) or per text (encoder)."),
                generate: int = typer.Option(0, "--generate", help="Add this many teacher-sampled sequences (causal)."),
                sets: List[str] = typer.Option([], "--set", help="Any other field of the distill step, KEY=VALUE "
                                               "(see `secateur explain distill`), e.g. --set hidden=1."),
                evals: List[str] = typer.Option([], "--eval", help="Evaluate before/after: TASK or TASK:DATA."),
                out_dir: Optional[Path] = typer.Option(None, "--out", help="Write the artifact here."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and stop."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Distill a student from a teacher; prints the recipe it ran (resumes if killed, with the same --out)."""
    from .recipe import _parse_scalar

    sources = [d.strip() for d in data.split(",") if d.strip()]
    step: dict[str, Any] = {"method": "distill", "teacher": teacher, "data": sources, "steps": steps, "lr": lr,
                            "batch_size": batch_size, "seq_len": seq_len, "generate": generate}
    for text in sets:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise SecateurError(f"--set: got {text!r}, expected KEY=VALUE such as hidden=1")
        step[key.strip()] = _parse_scalar(raw, text)
    plan: list[dict[str, Any]] = []
    if sum(map(bool, (keep_layers, drop_layers, fresh))) > 1:
        raise SecateurError("give one of --keep-layers, --drop-layers and --fresh")
    loaded = None
    if fresh:
        from .distill.students import fresh as fresh_student, parse_overrides
        from . import lineage
        from .registry import load  # paths, hub ids and registry refs

        loaded = load(student)
        loaded.model = fresh_student(loaded.model, **parse_overrides(fresh))
        lineage.set_(loaded.model, None)  # a fresh student: none of the base's weights
        step["teacher"] = teacher or student
    if keep_layers or drop_layers:
        cut: dict[str, Any] = {"method": "structured", "mlp": 0.0}
        if keep_layers:
            try:
                cut["keep"] = [int(b) for b in keep_layers.split(",") if b.strip()]
            except ValueError:
                raise SecateurError(f"--keep-layers: got {keep_layers!r}, expected block indices such as 0,4,5") from None
        else:
            cut["drop_layers"] = drop_layers
        plan.append(cut)
    plan.append(step)
    spec: dict[str, Any] = {"model": student, "steps": plan,
                            "eval": [dict(zip(("task", "data"), e.split(":", 1))) for e in evals]}
    if drop_layers:
        spec["data"] = {"source": sources[0].split(":")[0], "samples": 128, "seq_len": min(seq_len, 256)}
        if ":" in sources[0]:
            spec["data"]["split"] = sources[0].split(":", 1)[1]
    recipe = _keep_to_blocks(spec)
    _run(recipe, out_dir, dry_run, as_json, loaded=loaded)
    if not as_json:  # on success only: an error is shown alone
        err.print("[bold]recipe[/bold]" + (f" (on a fresh student: {fresh})" if fresh else ""))
        err.print(recipe.dump(), markup=False, highlight=False)


def _keep_to_blocks(spec: dict[str, Any]) -> Any:
    """``keep: [0, 4, 5]`` of the CLI becomes the structured step's ``blocks`` to remove."""
    from transformers import AutoConfig

    from .models import resolve as _resolve
    from .recipe import Recipe

    for step in spec["steps"]:
        keep = step.pop("keep", None)
        if keep is not None:
            n = AutoConfig.from_pretrained(_resolve(spec["model"])).num_hidden_layers
            bad = [b for b in keep if not 0 <= b < n]
            if bad or not keep:
                raise SecateurError(f"--keep-layers: the model has blocks 0..{n - 1}; got {keep}")
            step["blocks"] = [b for b in range(n) if b not in keep]
            if not step["blocks"]:
                step.pop("blocks")
                spec["steps"].remove(step)
    return Recipe.from_dict(spec)


def _run_step(model: str, step: dict[str, Any], data: Optional[str], samples: int, seq_len: int, evals: List[str],
              out_dir: Optional[Path], dry_run: bool, as_json: bool, storage: str = "dense") -> None:
    """The one-step recipe of ``prune``/``quantize``: run, then printed (it works as it is in a recipe file)."""
    from .recipe import Recipe

    spec: dict[str, Any] = {"model": model, "steps": [step]}
    if data is not None:
        spec["data"] = {"source": data, "samples": samples, "seq_len": seq_len}
    spec["eval"] = [dict(zip(("task", "data"), e.split(":", 1))) for e in evals]
    recipe = Recipe.from_dict(spec)
    _run(recipe, out_dir, dry_run, as_json, storage)
    if not as_json:  # on success only: an error is shown alone, not after a screen of YAML
        err.print("[bold]recipe[/bold] (works as it is in a recipe file)")
        err.print(recipe.dump(), markup=False, highlight=False)
        scheme = scheme_name(recipe.steps[0])
        if scheme:
            err.print(f"scheme: {scheme}", markup=False, highlight=False)


def scheme_name(config: Any) -> str:
    """``W8A8``, ``W4A16 g128``, ``W8A8-FP8``…: what a quantization step makes, in the usual words
    ("" for other steps)."""
    bits, activations = getattr(config, "bits", None), getattr(config, "activations", None)
    if getattr(config, "method", "") == "fp8":
        return "W8A8-FP8" if activations == "fp8" else "W8A16-FP8"
    if bits is None:
        return ""
    name = f"W{bits}A{8 if activations == 'int8' else 16}"
    strategy = getattr(config, "strategy", None)
    return name + (f" g{config.group_size}" if strategy == "group" else " per tensor" if strategy == "tensor"
                   else " per channel")


def _structured_step(heads: float, mlp: float, drop_layers: int, blocks: Optional[str], hidden: float,
                     importance: Optional[str], depth_importance: Optional[str], gqa: Optional[str],
                     non_uniform: bool) -> dict[str, Any]:
    step: dict[str, Any] = {"method": "structured", "heads": heads, "mlp": mlp, "hidden": hidden,
                            "drop_layers": drop_layers}
    if blocks:
        try:
            step["blocks"] = [int(b) for b in blocks.split(",") if b.strip()]
        except ValueError:
            raise SecateurError(f"--blocks: got {blocks!r}, expected block indices such as 1,2") from None
    for key, value in (("importance", importance), ("depth_importance", depth_importance), ("gqa", gqa)):
        if value is not None:
            step[key] = value
    if non_uniform:
        step["uniform"] = False
    return step


def _shapes_table(before: dict[str, Any], after: dict[str, Any]) -> Table:
    def show(value: Any) -> str:
        if isinstance(value, list):
            return str(value[0]) if len(set(value)) == 1 else ",".join(map(str, value))
        return f"{value:,}" if isinstance(value, int) else str(value)

    table = Table("", "before", "after", title="structured pruning: shapes")
    for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "parameters"):
        table.add_row(key, show(before[key]), show(after[key]))
    return table


@app.command("export")
def export_cmd(artifact: Path = typer.Argument(..., help="A secateur artifact (possibly with sparse storage)."),
               out_dir: Path = typer.Argument(..., help="Where the export goes (a folder; a .gguf file for gguf)."),
               fmt: str = typer.Option("dense", "--format", help="dense (a checkpoint stock transformers loads), "
                                                                 "gguf (llama.cpp) or onnx (ONNX Runtime)."),
               gguf_type: str = typer.Option("f16", "--type", help="gguf: f32, f16, q8_0 or q4_0.")) -> None:
    """Write an artifact for another runtime: a plain dense checkpoint that stock transformers loads
    with from_pretrained, or a GGUF file for llama.cpp (Llama-family models; our Q8_0/Q4_0-shaped
    integers carried over, the rest requantized, as the record beside the file says), or an ONNX
    folder for ONNX Runtime (encoders with sentence embeddings, causal LMs with a KV cache; our
    integers and scales kept as QDQ or integer MatMuls, verified against secateur's outputs)."""
    formats = ("dense", "gguf", "onnx")
    if fmt == "dense":
        from .artifacts import export_dense

        out.print(f"wrote {export_dense(artifact, out_dir)}")
    elif fmt == "gguf":
        from .artifacts.gguf import export_gguf

        out.print(f"wrote {export_gguf(artifact, out_dir, gguf_type)}")
    elif fmt == "onnx":
        from .artifacts.onnx import export_onnx

        out.print(f"wrote {export_onnx(artifact, out_dir)}")
    else:
        from .errors import did_you_mean, one_of

        raise SecateurError(f"unknown export format '{fmt}'{did_you_mean(fmt, formats)}; valid formats: {one_of(formats)}")


def _run(recipe: Any, out_dir: Optional[Path], dry_run: bool, as_json: bool, storage: str = "dense",
         loaded: Any = None) -> None:
    from .pipeline import check_storage, dry_run as plan_recipe, run_recipe

    check_storage(storage)  # every option is checked in a dry run too
    if dry_run:
        plan = plan_recipe(recipe)
        table = Table("step", "method", "modules touched", title="dry run: recipe is valid")
        for entry in plan:
            names = [m["name"] for m in entry.get("modules", [])]
            shown = ", ".join(names[:6]) + (f", … ({len(names)} in all)" if len(names) > 6 else "")
            table.add_row(str(entry["step"]), entry["method"], shown)
        _emit({"recipe": recipe.to_dict(), "plan": plan}, as_json, table)
        return
    _report(run_recipe(recipe, out=out_dir, storage=storage, loaded=loaded), as_json)


def _report(result: Any, as_json: bool) -> None:
    table = Table("step", "method", "seconds", "result", title="compress")
    for i, h in enumerate(result.steps):
        summary = {k: v for k, v in h["result"].items() if not isinstance(v, (dict, list))}
        table.add_row(str(i), h["step"]["method"], str(h["seconds"]), json.dumps(summary))
    if not as_json:
        _show(table)
        for h in result.steps:
            if isinstance(h["result"].get("before"), dict) and isinstance(h["result"].get("after"), dict):
                out.print(_shapes_table(h["result"]["before"], h["result"]["after"]))
        if result.before:
            from .evaluate import EvalResult, results_table

            rows = [EvalResult.from_dict(r) for pair in zip(result.before, result.after) for r in pair]
            out.print(results_table(rows, title="before / after", labels=["before", "after"] * len(result.before)))
        if result.artifact:
            out.print(f"artifact: {result.artifact}")
    else:
        _emit(result.to_dict(), True)


def _verdict_value(verdict: dict[str, Any]) -> str:
    unit, value = verdict.get("unit", ""), verdict["value"]
    if unit == "bytes":
        return f"{value / 1e6:.2f} MB"
    return f"{value:+.4g}%" if unit == "%" else f"{value:.4g}{unit}"


@app.command("run")
def run_cmd(pipeline_path: Path = typer.Argument(..., metavar="PIPELINE", help="Pipeline file (.yaml or .json)."),
            workdir: Path = typer.Option(Path("secateur-runs"), "--workdir", "-w",
                                         help="Where stages, caches and results are kept (re-runs reuse them)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Print the DAG: what is cached and what will run."),
            keep_going: bool = typer.Option(False, "--keep-going",
                                            help="Build every variant even after one fails a gate."),
            allow_rejected: bool = typer.Option(False, "--allow-rejected",
                                                help="Exit 0 when variants are only rejected by their gates "
                                                     "(a demo); errors still exit non-zero."),
            register: bool = typer.Option(True, "--register/--no-register",
                                          help="Record the family in the registry (SECATEUR_HOME)."),
            check_plan: bool = typer.Option(True, "--plan/--no-plan",
                                            help="Refuse a run the resource planner predicts will not fit in "
                                                 "memory (secateur plan shows the plan)."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Build a family of variants from a pipeline file: each from its parent, cached, resumable,
    evaluated and admitted by its gates, and recorded in the registry with their aliases. Exits 1
    when a variant fails a gate, naming it and by how much."""
    from .pipeline import Pipeline, plan_pipeline, run_pipeline

    pipeline = Pipeline.load(pipeline_path)
    if dry_run:
        rows = plan_pipeline(pipeline, workdir)
        table = Table("variant", "parent", "steps", "state", "key", "gates", "aliases",
                      title=f"pipeline {pipeline.name}: {len(rows)} variants of {pipeline.base}")
        for r in rows:
            table.add_row(r["variant"], r["parent"], " → ".join(r["steps"]), r["state"], r["key"] or "—",
                          "; ".join(r["gates"]) or "—", ", ".join(r["aliases"]) or "—")
        _emit({"pipeline": pipeline.name, "plan": rows}, as_json, table)
        return
    registry = None
    if register:
        from .registry import Registry

        registry = Registry()
    try:
        result = run_pipeline(pipeline, workdir, keep_going=keep_going, registry=registry, check_plan=check_plan)
    finally:
        if registry is not None:
            registry.close()
    table = Table("variant", "parent", "status", "cached", "seconds", "evaluations", "gates",
                  title=f"pipeline {result.name} ({result.seconds:.1f} s)")
    for name, s in result.stages.items():
        evals = ", ".join(f"{e['task']} {e['value']:.4g}" for e in s.evaluations)
        gates = ", ".join(f"{'ok' if v['passed'] else 'FAIL'} {v['kind']} {_verdict_value(v)}" for v in s.verdicts)
        seconds = f"{s.seconds:.1f}" + (f" (plan {s.predicted['seconds']:.1f})" if s.predicted and not s.cached else "")
        table.add_row(name, s.parent, s.status, "yes" if s.cached else "no", seconds, evals or "—",
                      gates or (s.error or "—"))
    _emit(result.to_dict(), as_json, table)
    if not as_json:
        out.print(f"results: {result.workdir}/result.json")
        if registry is not None:
            out.print(f"registered in {registry.home}: family '{result.family}' "
                      f"(secateur registry list {result.family})")
    if result.failures:
        for line in result.failures:
            err.print(line)
        if not (allow_rejected and all(s.status != "failed" for s in result.stages.values())):
            raise typer.Exit(1)


@app.command("search")
def search_cmd(model: str = typer.Argument(..., metavar="MODEL", help="Model directory, artifact, registry ref or hub id."),
               space_path: Optional[Path] = typer.Option(None, "--space", metavar="SPACE.yaml",
                                                         help="The search space (default: the model kind's)."),
               budget: str = typer.Option("30m", "--budget", help="Time budget (90s, 30m, 1.5h): no trial starts "
                                                                  "after it; the one in flight finishes."),
               backend: str = typer.Option("local", "--backend", help="local (a process pool with --workers) or ray."),
               workers: int = typer.Option(1, "--workers", help="Trials run at once."),
               trials: Optional[int] = typer.Option(None, "--trials", help="Measured trials at most (the space's "
                                                                           "'trials' otherwise)."),
               alias: list[str] = typer.Option([], "--alias", metavar="NAME=CONSTRAINTS",
                                               help="An alias for the best front member meeting the constraints, "
                                                    "e.g. fast='latency<=0.4x' (repeatable)."),
               family: Optional[str] = typer.Option(None, "--family", help="Registry family (default: the space's name)."),
               workdir: Path = typer.Option(Path("secateur-runs"), "--workdir", "-w",
                                            help="Where trials, stages and caches are kept (a re-run resumes)."),
               register: bool = typer.Option(True, "--register/--no-register",
                                             help="Record the front, every trial and every point in the registry."),
               confirm: bool = typer.Option(True, "--confirm/--no-confirm",
                                            help="Time the front again together with the dense model."),
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Search the space of compressed variants of MODEL: price every candidate with cheap proxies,
    measure the most promising (quality by the protocol, speed against the dense model), keep the
    measured Pareto front as a registry family with aliases (best, fastest, smallest, yours).
    Resumable: the same command again re-runs no finished trial."""
    import dataclasses as _dc

    from .models import resolve
    from .registry import resolve_model
    from .search import SearchSpace, parse_alias, parse_budget, search
    from .search.space import kind_of

    parse_budget(budget)
    aliases = dict(parse_alias(a) for a in alias)
    base = str(resolve(str(resolve_model(model))))
    kind = kind_of(base)
    default_name = f"{Path(base).name}-search"
    space = SearchSpace.load(space_path, kind, default_name) if space_path else SearchSpace.default(kind, default_name)
    if trials is not None:
        if trials < 1:
            raise SecateurError(f"--trials {trials}: expected a whole number >= 1")
        space = _dc.replace(space, trials=trials)
    registry = None
    if register:
        from .registry import Registry

        registry = Registry()
    try:
        result = search(base, space, budget=budget, backend=backend, workers=workers, workdir=workdir,
                        registry=registry, aliases=aliases, family=family, confirm=confirm)
    finally:
        if registry is not None:
            registry.close()
    table = Table("candidate", "proxy Δloss", "proxy speed-up", "proxy bytes", "quality", "drop", "speed-up",
                  "bytes", "front", title=f"search {result.name}: {result.coverage['measured']} of "
                                          f"{result.candidates} candidates measured ({result.seconds:.0f} s)")
    for p in sorted((p for p in result.points if p["measured"] or p["error"]),
                    key=lambda p: (not p["front"], -(p["measured"] or {}).get("speedup", 0))):
        m, x = p["measured"] or {}, p["proxies"] or {}
        names = [a for a, c in result.aliases.items() if c == p["id"]]
        table.add_row(p["label"], f"{x.get('loss_delta', float('nan')):.3g}", f"{x.get('speedup', 0):.2f}x",
                      f"{x.get('bytes', 0):.2f}x", f"{m['quality']:.4g}" if m else "failed",
                      f"{m['quality_drop']:+.3g}" if m else (p["error"] or "")[:60],
                      f"{(p['confirmed'] or m).get('speedup', 0):.2f}x" if m else "—",
                      f"{m['bytes']:.2f}x" if m else "—", ("yes " + " ".join("@" + n for n in names)) if p["front"] else "")
    _emit(result.to_dict(), as_json, table)
    if not as_json:
        c, corr = result.coverage, result.correlation
        out.print(f"coverage: {c['measured']} measured of {c['chosen']} chosen, {c['eligible']} predicted to meet the "
                  f"constraints, {c['candidates']} in the space" + (" (stopped by the budget)" if c["stopped_by_budget"] else ""))
        out.print("proxy rank correlation with the measurements (Spearman): " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} —" for k, v in corr.items() if k != "points"))
        out.print(f"results: {result.folder}/result.json")
        if result.registered:
            out.print(f"registered family '{result.family}': " + ", ".join(f"@{a}" for a in result.aliases))
    if not result.front:
        err.print("no measured variant meets the constraints" if result.coverage["measured"] else
                  "no trial finished within the budget")
        raise typer.Exit(1)


@app.command("plan")
def plan_cmd(pipeline_path: Path = typer.Argument(..., metavar="PIPELINE", help="Pipeline file (.yaml or .json)."),
             workdir: Path = typer.Option(Path("secateur-runs"), "--workdir", "-w",
                                          help="The run's folder: stages already built there cost nothing."),
             remeasure: bool = typer.Option(False, "--remeasure",
                                            help="Measure this machine's cost model again (about a minute)."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Predict each stage's wall time and peak memory on this machine before running, from the
    model's shapes, the calibration size, the method and a cost model measured once per machine.
    Exits 1 when the run would not fit in memory, naming the settings that would."""
    from .pipeline import Pipeline, plan_resources
    from .planner import cost_model, gib

    pipeline = Pipeline.load(pipeline_path)
    costs = cost_model(remeasure=remeasure)
    plan = plan_resources(pipeline, workdir, costs)
    table = Table("variant", "parent", "steps", "state", "time", "peak RSS", "largest parts",
                  title=f"plan of {pipeline.name} on {costs.machine.get('cpu', 'this machine')}, "
                        f"{costs.threads} threads")
    for s in plan.stages:
        parts = sorted(s.memory.items(), key=lambda kv: -kv[1])[:2]
        table.add_row(s.variant, s.parent, " → ".join(s.steps), "runs" if s.runs else "cached",
                      f"{s.seconds:.1f} s" if s.runs else "—", gib(s.peak_bytes) if s.runs else "—",
                      ", ".join(f"{k} {gib(v)}" for k, v in parts) if s.runs else "—")
    _emit({"pipeline": pipeline.name, **plan.to_dict()}, as_json, table)
    if not as_json:
        out.print(f"predicted: {plan.seconds:.0f} s of building, peak {gib(plan.peak_bytes)} "
                  f"(with the base held for its gates); available {gib(plan.available_bytes)} "
                  f"({plan.available_source})")
    if not plan.fits:
        err.print(plan.refusal())
        raise typer.Exit(1)


@app.command("report")
def report_cmd(family: str = typer.Argument(..., help="A family in the registry (secateur registry list)."),
               out_path: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
               home: Optional[Path] = typer.Option(None, "--home", help="Registry home (default: SECATEUR_HOME).")) -> None:
    """Write one self-contained HTML page for a family: Pareto plots (quality vs measured latency and
    vs bytes), the lineage graph, per-layer sparsity and bit widths, latency spread, gate verdicts and
    the cards side by side. Works offline (no network, no script)."""
    from .registry import Registry
    from .report import collect, write

    with Registry(home) as registry:
        family_data = collect(registry, family)
    out.print(f"wrote {write(family_data, out_path)} ({len(family_data['variants'])} variants of '{family}')")


@app.command("serve")
def serve_cmd(family: str = typer.Argument(..., help="A family in the registry (secateur registry list)."),
              config: Optional[Path] = typer.Option(None, "--config", "-c", help="serve.yaml: tiers, policy, batching, "
                                                                                  "limits (see docs/serve.md)."),
              host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
              port: int = typer.Option(8000, "--port", help="TCP port."),
              home: Optional[Path] = typer.Option(None, "--home", help="Registry home (default: SECATEUR_HOME)."),
              backend: str = typer.Option("local", "--backend", help="local (one process) or ray (a Ray Serve "
                                                                     "application: an ingress and one deployment per "
                                                                     "variant)."),
              ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: "
                                                                                    "start a local instance)."),
              num_cpus: float = typer.Option(0.0, "--num-cpus", help="CPUs each Ray Serve replica declares.")) -> None:
    """Serve a family behind one OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions,
    /v1/embeddings, /v1/models, /health, /ready, /metrics); a request's model names the family (the
    routing policy decides), a tier, an alias or a variant. Needs `pip install 'secateur[serve]'`
    (and 'secateur[ray]' for --backend ray)."""
    if backend not in ("local", "ray"):
        raise SecateurError(f"unknown backend '{backend}'; valid: local, ray")
    if backend == "ray":
        from .serve.ray_backend import serve_on_ray

        serve_on_ray(family, config, host=host, port=port, home=home, address=ray_address, num_cpus=num_cpus)
        return
    from .serve import serve

    serve(family, config, host=host, port=port, home=home)


@app.command("route-calibrate")
def route_calibrate_cmd(family: str = typer.Argument(..., help="A family in the registry."),
                        config: Optional[Path] = typer.Option(None, "--config", "-c", help="serve.yaml (its tiers, "
                                                                                            "cheapest first)."),
                        target_rate: float = typer.Option(0.3, "--target-rate", help="Share of requests to escalate."),
                        quantile: float = typer.Option(0.1, "--quantile", help="Quantile of the token log-probabilities."),
                        prompts: int = typer.Option(200, "--prompts", help="Calibration-split prompts."),
                        max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens each answer generates."),
                        out_path: Path = typer.Option(Path("cascade.json"), "--out", "-o", help="JSON for serve.yaml's "
                                                                                               "policy.calibration."),
                        home: Optional[Path] = typer.Option(None, "--home", help="Registry home.")) -> None:
    """Fit a confidence cascade's thresholds to a target escalation rate on TinyStories
    calibration-split prompts; serve.yaml reads the file: policy: {kind: cascade, calibration: FILE}."""
    from .serve.routing import calibrate_cascade

    result = calibrate_cascade(family, config, target_rate=target_rate, quantile=quantile, prompts=prompts,
                               max_tokens=max_tokens, home=home, out=out_path)
    for tier in result["tiers"]:
        out.print(f"{tier['tier']}: threshold {tier['threshold']:.4f} ({tier['escalated']}/{tier['prompts']} "
                  f"calibration prompts escalate)")
    out.print(f"wrote {out_path}")


@app.command("route-eval")
def route_eval_cmd(family: str = typer.Argument(..., help="A family in the registry."),
                   config: Optional[Path] = typer.Option(None, "--config", "-c", help="serve.yaml: its first tier is "
                                                                                       "the cheap one, its last the large."),
                   policy: str = typer.Option("cascade", "--policy", help="The policy to evaluate (cascade)."),
                   quantile: float = typer.Option(0.1, "--quantile", help="Quantile of the token log-probabilities."),
                   calibration_prompts: int = typer.Option(200, "--calibration-prompts"),
                   eval_prompts: int = typer.Option(500, "--eval-prompts"),
                   max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens each answer generates."),
                   batch: int = typer.Option(1, "--batch", help="Prompts answered together when timing (1: single)."),
                   out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the curve as JSON."),
                   home: Optional[Path] = typer.Option(None, "--home", help="Registry home.")) -> None:
    """The cost-quality curve of a routing policy as its threshold moves, on held-out TinyStories
    prompts (thresholds fitted on the calibration split): APGR and the cost at 80% of the gap recovered."""
    from .serve.routing import route_eval, route_eval_summary, route_eval_table

    if policy != "cascade":
        raise SecateurError(f"route-eval evaluates --policy cascade; got '{policy}'")
    result = route_eval(family, config, quantile=quantile, calibration_prompts=calibration_prompts,
                        eval_prompts=eval_prompts, max_tokens=max_tokens, batch=batch, home=home)
    out.print(route_eval_table(result))
    out.print(route_eval_summary(result))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.print(f"wrote {out_path}")


@app.command("bench-serve")
def bench_serve_cmd(url: str = typer.Argument("http://127.0.0.1:8000", help="A gateway on this machine."),
                    model: str = typer.Option(..., "--model", "-m", help="The request's model (family, tier, alias)."),
                    requests: int = typer.Option(200, "--requests", "-n", help="Requests to send at most."),
                    concurrency: int = typer.Option(8, "--concurrency", "-c", help="Clients at once."),
                    duration: float = typer.Option(60.0, "--duration", help="Seconds after which no request starts."),
                    max_tokens: int = typer.Option(32, "--max-tokens", help="Tokens per completion."),
                    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the summary as JSON.")) -> None:
    """A bounded loopback load: latency and first-token percentiles, tokens/s, errors, the share each
    variant served, the server's RSS at start and end. Stops by itself."""
    from .serve.bench import run_load, table

    result = run_load(url, model=model, requests=requests, concurrency=concurrency, duration_s=duration,
                      max_tokens=max_tokens)
    grid = Table(title=f"bench-serve {url} model={model}")
    grid.add_column("what")
    grid.add_column("value")
    for what, value in table(result):
        grid.add_row(str(what), str(value))
    out.print(grid)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.print(f"wrote {out_path}")
    if result["errors"]:
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(models: Path = typer.Option(..., "--models", help="Folder holding stories260K/hf and all-MiniLM-L6-v2."),
             out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where artifacts and demo.json go."),
             as_json: bool = typer.Option(False, "--json", help="Print the JSON summary.")) -> None:
    """Compress the real models end to end and print a before/after table."""
    from .demo import run_demo

    summary = run_demo(models, out_dir)
    if as_json:
        _emit(summary, True)


@import_app.command("llama2c")
def import_llama2c_cmd(model_bin: Path = typer.Argument(..., help="llama2.c checkpoint (.bin)"),
                       tokenizer_model: Path = typer.Argument(..., help="SentencePiece tokenizer (.model)"),
                       out_dir: Path = typer.Argument(..., help="Output Hugging Face model directory")) -> None:
    """Convert a llama2.c checkpoint into a Hugging Face Llama directory."""
    from .models.llama2c import import_llama2c

    path = import_llama2c(model_bin, tokenizer_model, out_dir)
    out.print(f"wrote {path}")


def _usage_error_classes() -> tuple[type, ...]:
    """Click's usage errors: typer bundles its own copy of click, whose classes are not click's."""
    import click

    classes: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException
        classes.append(ClickException)
    except ImportError:  # a typer that uses click itself
        pass
    return tuple(classes)


def _usage(exc: Any) -> None:
    """One line for a usage error (unknown command or option, missing argument) with the valid
    choices or a did-you-mean where click knows them; exit 2 (not a bug: no traceback hint)."""
    from .errors import did_you_mean

    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    option = getattr(exc, "option_name", None)
    ctx = getattr(exc, "ctx", None)
    if option and not getattr(exc, "possibilities", None) and ctx is not None:  # click suggested none
        message += did_you_mean(option, [o for p in ctx.command.params for o in getattr(p, "opts", [])])
    commands = sorted(getattr(getattr(ctx, "command", None), "commands", None) or [])
    if message.startswith("No such command") and commands and "did you mean" not in message.lower():
        word = message.split("'")[1] if message.count("'") >= 2 else ""
        message += did_you_mean(word, commands) or f" (commands: {', '.join(commands)})"
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else " (see `secateur --help`)"
    err.print(f"error: {message}{where}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


# warnings the libraries print on every run that say nothing to a secateur user (the deprecations
# are of arguments secateur passes for the transformers versions it supports); --debug shows them
KNOWN_NOISE = (r".*`past_key_values`.* deprecated.*", r".*`past_key_values`/`cache_params` are deprecated.*",
               r".*torch\.jit\.script_method.* deprecated.*", r"To copy construct from a tensor, it is recommended.*",
               r".*torch\.ao\.quantization is deprecated.*")


def _quiet_known_noise() -> None:
    import logging
    import re
    import warnings

    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    noise = re.compile("|".join(KNOWN_NOISE), re.S)

    class _DropKnown(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not noise.match(record.getMessage())

    # a logger's filters see the records made at that logger (transformers need not be imported yet)
    for name in ("transformers", "transformers.utils.generic", "transformers.modeling_utils"):
        logging.getLogger(name).addFilter(_DropKnown())


def main(argv: Optional[List[str]] = None) -> None:
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    _ARGS[:] = args
    debug = "--debug" in args
    if debug:  # accepted in any position, not only before the command
        args = ["--debug"] + [a for a in args if a != "--debug"]
    else:
        _quiet_known_noise()
    usage_errors = _usage_error_classes()
    try:
        code = app(args=args, prog_name="secateur", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except usage_errors as exc:
        if debug:
            raise
        _usage(exc)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        _interrupted(args)
    except SecateurError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            raise
        err.print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                  markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into a returned 130 (with standalone_mode off), never an exit
        _interrupted(args)
    if isinstance(code, int) and code:
        sys.exit(code)


def _interrupted(args: List[str]) -> None:
    """Ctrl-C: exit 130 (never 0, so ``secateur … && next`` stops) with one line saying so."""
    command = next((a for a in args if not a.startswith("-")), "secateur")
    resumes = "; re-running the same command resumes from its last checkpoint" if "--out" in args or any(
        a.startswith("--out=") or a.startswith("--checkpoint") for a in args) else ""
    err.print(f"interrupted: {command} stopped before it finished (Ctrl-C){resumes}", markup=False, highlight=False,
              soft_wrap=True)
    sys.exit(130)


if __name__ == "__main__":
    main()
