"""Run a recipe end to end: load → calibration data → evaluate before → compress_ → evaluate after → save.

    result = run_recipe(Recipe.load("recipe.yaml"), out="artifacts/stories-mag50")

The returned :class:`RunResult` holds the metrics before and after, the per-step results and the
artifact path; the artifact's compression card records the same.
"""

from __future__ import annotations

import importlib

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import lineage
from ..errors import ConfigError, SecateurError, did_you_mean

log = logging.getLogger(__name__)


STORAGE = {"dense": "none", "sparse": "auto"}


@dataclass
class RunResult:
    recipe: dict[str, Any]
    model: str
    before: list[dict[str, Any]] = field(default_factory=list)
    after: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    artifact: str | None = None
    data_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def calibration_data(recipe: Any, tokenizer: Any) -> Any:
    """The recipe's calibration set, or None when it names no data."""
    if recipe.data is None:
        if recipe.needs_data:
            raise SecateurError("data: this recipe has a step that needs calibration data; add e.g. "
                                "'data: {source: tinystories, samples: 128, seq_len: 256}'")
        return None
    from ..data import calibration_set, source

    spec = recipe.data
    mode = spec.mode or source(spec.source).default_mode
    return calibration_set(spec.source, tokenizer, spec.samples, spec.seq_len, spec.seed, mode, split=spec.split)


def evaluate_all(model: Any, tokenizer: Any, specs: Any) -> list[dict[str, Any]]:
    """The recipe's evaluations of ``model`` in the runtime's fastest eager form (a W8A8 encoder
    gets fused blocks: :func:`secateur.runtime.optimize_`; the results' settings say so)."""
    from ..evaluate import evaluate
    from ..runtime import optimize_

    optimize_(model)
    return [evaluate(model, tokenizer, spec.task, spec.data, **dict(spec.options)).to_dict() for spec in specs]


def dry_run(recipe: Any) -> list[dict[str, Any]]:
    """Validate a recipe against its model without loading weights: the modules each step touches."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..api import get_method
    from ..models import resolve as _resolve
    from ..models.arch import arch_for
    from ..targets import describe_selection, select_modules

    if recipe.model is None:
        raise SecateurError("model: the recipe names no model; add 'model: PATH' or pass --set model=PATH")
    config = AutoConfig.from_pretrained(_resolve(recipe.model))
    arch = arch_for(config.model_type)
    auto = AutoModelForCausalLM if arch.kind == "causal" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    plan = []
    for i, step in enumerate(recipe.steps):
        method = get_method(step.method)
        entry: dict[str, Any] = {"step": i, "method": step.method, "needs_data": method.needs_data}
        if hasattr(step, "targets"):
            try:
                selected = select_modules(model, step.targets, step.ignore)
            except ConfigError as exc:
                raise ConfigError(f"steps[{i}].{exc.path}", str(exc).split(": ", 1)[-1]) from None
            entry["modules"] = describe_selection(selected)
        describe = getattr(importlib.import_module(type(step).__module__), "describe", None)
        if describe is not None:  # a method that can say more without weights (structured: the new shapes)
            try:
                entry.update(describe(model, step))
            except ConfigError as exc:
                raise ConfigError(f"steps[{i}].{exc.path}", str(exc).split(": ", 1)[-1]) from None
        plan.append(entry)
    return plan


def check_storage(storage: str) -> None:
    """One line naming the valid storage modes (and the closest one) for anything else."""
    if storage not in STORAGE:
        raise SecateurError(f"unknown storage '{storage}'{did_you_mean(storage, STORAGE)}; valid: {', '.join(STORAGE)}")


def run_recipe(recipe: Any, out: str | Path | None = None, loaded: Any = None,
               evaluate_before: bool = True, storage: str = "dense", *, evaluate_after: bool = True,
               write: bool = True) -> RunResult:
    """Run every step of ``recipe`` on its model (or on ``loaded``, a :class:`secateur.Loaded`).

    ``evaluate_before=False`` skips the "before" evaluations (when the caller already has them).
    ``storage="sparse"`` writes pruned weights as bitmask + values (``secateur export`` makes a
    dense copy for stock transformers); ``"dense"`` writes a plain checkpoint. Over several
    processes (torchrun) every rank compresses its share; ``write=False`` and
    ``evaluate_after=False`` are for the ranks other than 0, which wait for each other before rank 0
    evaluates, saves and clears the resume folder.
    """
    check_storage(storage)
    from ..api import compress_
    from ..artifacts import save
    from ..registry import load  # a path, a hub id or a registry ref (family@alias)

    if recipe.data is not None:  # a missing or mistyped data file fails now, not after loading the model
        from ..data import source

        source(recipe.data.source)
    if loaded is None:
        if recipe.model is None:
            raise SecateurError("model: the recipe names no model; add 'model: PATH' or pass --set model=PATH")
        loaded = load(recipe.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    data = calibration_data(recipe, tokenizer)
    result = RunResult(recipe=recipe.to_dict(), model=str(recipe.model or loaded.info.get("name")),
                       data_fingerprint=getattr(data, "fingerprint", None))
    if evaluate_before:
        log.info("evaluating %s before compression", result.model)
        result.before = evaluate_all(model, tokenizer, recipe.eval)
    resume = _resume_dir(out)
    compress_(model, recipe, data=data, checkpoint_dir=resume, tokenizer=tokenizer)
    from ..calibrate import world

    if world()[1] > 1:  # every rank's last checkpoint is written before rank 0 clears the folder
        import torch.distributed as dist

        dist.barrier()
    result.steps = lineage.read(model).history()
    if not write:
        return result
    result.after = evaluate_all(model, tokenizer, recipe.eval) if evaluate_after else []
    if out is not None:
        metrics = {"before": result.before, "after": result.after}
        result.artifact = str(save(model, out, tokenizer=tokenizer, recipe=recipe, metrics=metrics,
                                   sparse=STORAGE[storage]))
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)
    return result


def _resume_dir(out: str | Path | None) -> Path | None:
    """Where a run writing ``out`` keeps its per-block checkpoints until the artifact is saved."""
    if out is None:
        return None
    out = Path(out).resolve()
    return out.parent / f".{out.name}.resume"


def run_streamed(recipe: Any, out: str | Path | None, storage: str = "dense", *, data: Any = None) -> RunResult:
    """Run ``recipe`` out of core: its model is read block by block from its safetensors shards,
    each block compressed and written to the artifact as soon as it is done, so memory holds one
    block (and its calibration activations), never the model. The embedding keeps only the rows
    the calibration tokens use; the head is copied to the output in row chunks. A killed run
    resumes at the first block not written. ``data`` (a CalibrationSet) replaces the recipe's.

    Streamed steps are the calibrated methods whose work happens inside the calibration loop
    (:data:`secateur.artifacts.stream.STREAMS`); the recipe's evaluations are not run (the model
    does not fit in memory to run them) and the card says so."""
    import torch

    from ..api import compress_
    from ..artifacts.stream import PER_BLOCK, BlockStream, check_streamable, compact_ids, skeleton
    from ..data.calibration import CalibrationSet
    from ..models.arch import arch_of
    from ..targets import select_modules

    check_storage(storage)
    if out is None:
        raise SecateurError("--stream writes the artifact block by block as it goes: give --out DIR")
    check_streamable(list(recipe.steps))
    if len(recipe.steps) != 1:
        raise SecateurError(f"a streamed recipe runs one step, got {len(recipe.steps)}: run the first step streamed, "
                            "then the next one on its artifact")
    source = _stream_source(recipe.model)
    tokenizer = None
    if data is None and recipe.data is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError, TypeError) as exc:
            raise SecateurError(f"model: no tokenizer in {source} to read the calibration data with ({exc})") from None
        data = calibration_data(recipe, tokenizer)
    calibrated = recipe.steps[0].method not in PER_BLOCK
    if data is None and calibrated:
        raise SecateurError("data: a streamed step needs calibration data; add e.g. "
                            "'data: {source: tinystories, samples: 128, seq_len: 256}'")
    resume = _resume_dir(out)
    assert resume is not None
    stream = BlockStream(source, resume / "stream", sparse=STORAGE[storage])
    rows, renumbered = compact_ids(data.input_ids if data is not None else torch.zeros(1, 1, dtype=torch.long))
    model = skeleton(source, stream, rows=rows)
    prefix = arch_of(model).arch.block_prefix(model)
    step = recipe.steps[0]
    outside = [n for n in select_modules(model, step.targets, step.ignore) if not n.startswith(prefix + ".")]
    if outside:
        raise SecateurError(f"steps[0]: '{outside[0]}' is outside the transformer blocks, and a streamed run compresses "
                            f"the blocks only; add it to ignore (ignore: [{outside[0]}])")
    from ..artifacts.checkpoint import weights_hash

    log.info("hashing %s (the resume key and the card's base model)", source)
    lineage.set_(model, lineage.Lineage(lineage.Base(str(recipe.model), str(source), weights_hash(source),
                                                     model.config.model_type)))
    compact = CalibrationSet(renumbered, data.fingerprint, dict(getattr(data, "settings", {}) or {})) \
        if data is not None else None
    result = RunResult(recipe=recipe.to_dict(), model=str(recipe.model),
                       data_fingerprint=data.fingerprint if data is not None else None)
    if recipe.eval:
        log.warning("a streamed run does not evaluate (the model does not fit in memory); evaluate the artifact "
                    "with 'secateur eval' where it fits")
    if step.method in PER_BLOCK:  # data-free: applied block by block, outside the calibration loop
        import time

        start = time.perf_counter()
        with torch.no_grad():
            out_result = apply_per_block(model, step, stream, prefix)
        lineage.of(model).add(lineage.Step(step.to_dict(), round(time.perf_counter() - start, 3), None, out_result))
    else:
        with torch.no_grad():
            compress_(model, recipe, data=compact, checkpoint_dir=resume, tokenizer=tokenizer, block_hooks=stream)
    result.steps = lineage.read(model).history()
    skipped = {"evaluation": "not run: streamed (the model is compressed block by block from disk)"}
    result.artifact = str(stream.finish(model, prefix, out, recipe=recipe, metrics={"before": [], "after": []},
                                        extra=skipped))
    shutil.rmtree(resume, ignore_errors=True)
    return result


def _stream_source(model: Any) -> Path:
    """The local safetensors directory a streamed run reads (a path or a registry ref)."""
    if model is None:
        raise SecateurError("model: the recipe names no model; add 'model: PATH' or pass --set model=PATH")
    from ..registry import resolve_variant

    variant = resolve_variant(str(model), None) if not Path(str(model)).expanduser().exists() else None
    path = Path(variant.path if variant is not None else str(model)).expanduser()
    if not path.is_dir():
        raise SecateurError(f"model: '{model}' is not a local directory; a streamed run reads a safetensors "
                            "checkpoint directory (or a registry ref)")
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise SecateurError(f"model: {path} has no config.json and .safetensors weights to stream")
    from ..models.arch import ARCHS
    import json as _json

    model_type = _json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ARCHS or ARCHS[model_type].kind != "causal":
        causal = sorted(k for k, a in ARCHS.items() if a.kind == "causal")
        raise SecateurError(f"model: streaming runs causal LMs ({', '.join(causal)}); {path} is '{model_type}'")
    return path


def apply_per_block(model: Any, step: Any, stream: Any, block_prefix: str) -> dict[str, Any]:
    """Run a data-free method (:data:`PER_BLOCK`) block by block: each block read, the method
    applied to the modules of that block the step selects, the block written and freed. Blocks
    already written (a killed run) are skipped; their results come back from their records.
    Returns the method's result over the whole model (its layers merged)."""
    import dataclasses

    from ..api import Context, get_method
    from ..progress import track
    from ..targets import select_modules

    method = get_method(step.method)
    selected = list(select_modules(model, step.targets, step.ignore))
    blocks = model.get_submodule(block_prefix)
    first = stream.done_blocks()
    for index in track(range(first, len(blocks)), f"{step.method} (block)", total=len(blocks) - first):
        prefix = f"{block_prefix}.{index}"
        names = [n for n in selected if n.startswith(prefix + ".")]
        stream.load(index, prefix, blocks[index])
        result = None
        if names:
            result = method.apply(model, dataclasses.replace(step, targets=tuple(names), ignore=()), Context()) or {}
        stream.done(index, prefix, blocks[index], result)
    results = [r["result"] for r in stream.records(len(blocks)) if r.get("result")]
    return _merged(results, {n: _numel(model.get_submodule(n)) for n in selected})


def _numel(module: Any) -> int:
    from ..models.layers import weight_matrix

    try:
        return weight_matrix(module).numel()
    except AttributeError:  # a QuantLinear on the meta device: its integers have the weight's shape
        return module.weight_q.numel()


def _merged(results: list[dict[str, Any]], numel: dict[str, int]) -> dict[str, Any]:
    """One result from per-block results: the layers merged, ``modules`` counted again and a
    ``sparsity`` (magnitude) weighted by each layer's size."""
    if not results:
        return {"modules": 0, "layers": {}}
    merged = dict(results[-1])
    layers: dict[str, Any] = {}
    for r in results:
        layers.update(r.get("layers", {}))
    merged.update(layers=layers, modules=len(layers))
    if "sparsity" in merged and all(isinstance(v, (int, float)) for v in layers.values()):
        total = sum(numel[n] for n in layers)
        merged["sparsity"] = round(sum(v * numel[n] for n, v in layers.items()) / max(total, 1), 6)
    return merged
