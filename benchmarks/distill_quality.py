"""Recovery training: distillation, QAT and gradual pruning against their starting points.

Every run starts from a freshly loaded dense model and goes through the registered steps (the
same code as `secateur distill` and a recipe's `method: distill|qat|gradual`); the teacher is the
dense model.

P2 (MiniLM teacher, STS-B dev Spearman × 100; unlabelled text: STS-B train sentences, WikiText-2
validation lines, C4 validation documents, ≤ 128 tokens each):
  minilm-depth  3 of 6 layers kept by block influence (structured), then distilled on sentence
                embeddings (relative MSE + cosine); the dev curve is saved as a plot; bar ≥ 84.0
                within 30 minutes.
  minilm-mlp50  50% of MLP channels removed (Taylor importance), then distilled; bar ≥ 86.0.
P1 (stories260K teacher, TinyStories perplexity on the evaluation split; training text: the P1
calibration paragraphs plus stories sampled from the teacher):
  stories-depth one of 5 blocks removed by influence, then distilled (KL) on 512-token windows,
                the real ones read 20 times per epoch; then one softmax temperature fitted on the
                real text and folded in (the dense model calibrated the same way is reported
                beside it, the fair reference). A second distill step continues from the first
                (a new warm-up, cosine to zero) and fits its own temperature; a third continues on
                the samples cut into paragraphs (BOS + paragraph, the evaluation's format; the
                teacher writes newlines between them) and fits its own; bar ≤ 5.75. The first
                step at shorter lengths (--sweep) fits the gap to the teacher as a power law of the
                steps: how long the bar would take at that slope.
  stories-depth-levers  (only when named in --only) from the stories-depth student (its steps
                resume from --checkpoint-dir), what else might close its gap: 600 more steps of the
                third step's setting, the same toward the teacher calibrated on the real text
                (calibrate_teacher), the logit scale best on the evaluation split itself (a bound on
                what any temperature could do, not a method), and the untrained student for every
                choice of removed block.
  stories-qat   W4 per-channel QAT (learnable scales, KL from the fp32 model) vs GPTQ W4 on the
                128 × 256 P1 calibration windows; bar: QAT below GPTQ.
  stories-gradual  50% unstructured sparsity reached gradually while distilling vs one-shot
                SparseGPT 50%; bar: gradual below SparseGPT.

    python benchmarks/distill_quality.py [--only minilm-depth,stories-qat] [--scale 1.0] [--sweep 250,500,1000]
        [--checkpoint-dir DIR]

Prints a table and writes benchmarks/results/distill_quality.json (+ distill_minilm_curve.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SHARED, environment, print_table, setup_env, write_json  # noqa: E402

MINILM_DATA = ("stsb:train", "wikitext2:validation", "c4")
STORIES_DATA = ("tinystories:calibration",)
STAGE_TWO = 7000   # stories-depth: steps of the second distill step
STAGE_THREE = 3000  # stories-depth: steps of the third, on the samples cut into paragraphs
LEVER_STEPS = 600   # stories-depth-levers: steps of each continuation
SECTIONS = ("minilm-depth", "minilm-mlp50", "stories-depth", "stories-qat", "stories-gradual")
EXTRA = ("stories-depth-levers",)   # run only when named in --only


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_step(model: Any, config: Any, *, teacher: Any, tokenizer: Any, data: Any = None,
             evaluate: Any = None, checkpoint_dir: Path | None = None,
             generation_dir: Path | None = None) -> dict[str, Any]:
    """One registered step with an extra per-evaluation metric (the curve); with a checkpoint
    directory the training checkpoints there and a re-run resumes from it; teacher samples are
    cached in ``generation_dir`` (shared by runs) when given."""
    from secateur.api import Context, get_method

    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(data=data, teacher=teacher, tokenizer=tokenizer, evaluate=evaluate, generation_dir=generation_dir,
                  checkpoint_dir=checkpoint_dir)
    start = time.perf_counter()
    result = get_method(config.method).apply(model, config, ctx)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["history_full"] = [h.to_dict()["history"] for h in ctx.training][-1]
    return result


class Model:
    def __init__(self, path: Path, task: str, data: str, options: dict):
        import secateur

        self.path, self.task, self.data, self.options = path, task, data, options
        self.teacher, self.tokenizer, _ = secateur.load(path)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dense = self.metric(self.teacher)

    def fresh(self) -> Any:
        import secateur

        return secateur.load(self.path).model

    def metric(self, model: Any) -> float:
        from secateur.evaluate import evaluate

        return evaluate(model, self.tokenizer, self.task, self.data, **self.options).value


def minilm(section: str, scale: float, checkpoints: Path | None) -> dict[str, Any]:
    from secateur import DistillConfig, StructuredConfig, compress_
    from secateur.data import calibration_set

    m = Model(SHARED / "models" / "all-MiniLM-L6-v2", "sts", "stsb", {"split": "dev"})
    calib = calibration_set("stsb", m.tokenizer, 128, 128, split="train")
    student = m.fresh()
    cut = (StructuredConfig(mlp=0.0, drop_layers=3) if section == "minilm-depth"
           else StructuredConfig(mlp=0.5, importance="taylor"))
    compress_(student, cut, data=calib)
    from secateur import lineage
    report = lineage.of(student).history()[-1]["result"]
    start_value = m.metric(student)
    log(f"[{section}] dense {m.dense:.2f}, start {start_value:.2f} (kept blocks {report.get('kept_blocks')})")
    steps = max(1, int((600 if section == "minilm-depth" else 400) * scale))
    config = DistillConfig(data=MINILM_DATA, seq_len=128, steps=steps, batch_size=64, lr=1e-4 if section ==
                           "minilm-depth" else 5e-5, warmup=0.05, embedding=1.0, hidden=0.0, eval_every=max(1, steps // 8),
                           checkpoint_every=100 if checkpoints else 0, holdout=0.02, dtype="bfloat16")
    curve: list[tuple[int, float]] = []

    def evaluate(model: Any) -> dict[str, float]:
        value = m.metric(model)
        curve.append((len(curve), value))
        log(f"[{section}] eval: STS-B dev {value:.2f}")
        return {"stsb_dev": value}

    result = run_step(student, config, teacher=m.teacher, tokenizer=m.tokenizer, evaluate=evaluate,
                      checkpoint_dir=checkpoints / section if checkpoints else None)
    final = m.metric(student)
    log(f"[{section}] distilled: {final:.2f} ({result['wall_seconds']}s)")
    return {"dense": m.dense, "start": start_value, "final": final, "seconds": result["wall_seconds"],
            "bar": 84.0 if section == "minilm-depth" else 86.0, "config": config.to_dict(),
            "structured": {k: report.get(k) for k in ("kept_blocks", "removed_blocks", "parameters_ratio")},
            "evals": result["evals"], "best": result["best"], "settings": result["settings"],
            "stopped_early": result["stopped_early"]}


def stories(section: str, scale: float, checkpoints: Path | None, sweep: list[int] = (),
            keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """One P1 section; ``keep`` (a dict) receives the trained stories-depth student and its setting."""
    from secateur import DistillConfig, GPTQConfig, GradualConfig, QATConfig, SparseGPTConfig, compress_
    from secateur.data import calibration_set

    m = Model(SHARED / "models" / "stories260K" / "hf", "perplexity", "tinystories", {})
    calib = calibration_set("tinystories", m.tokenizer, 128, 256)
    common = dict(data=STORIES_DATA, seq_len=256, batch_size=16, eval_every=0, checkpoint_every=100 if checkpoints else 0,
                  holdout=0.05,
                  temperature=1.0)
    out: dict[str, Any] = {"dense": m.dense}
    if section == "stories-depth":
        student = one_block_removed(m, calib)
        out["start"] = m.metric(student)
        # 512-token windows, the length P1 scores: a student trained on 256 only loses the
        # teacher's behaviour past about position 400; 30000 samples read about 3 times each,
        # drawn at temperature 1.2 (better on real text than 1.0 or 0.8); the 77 real windows
        # read 20 times per epoch (5% of the reads); then one temperature fitted on the real text
        config = DistillConfig(steps=max(1, int(3000 * scale)), lr=3e-3, generate=30000, generate_temperature=1.2,
                               repeat_real=20, fit_temperature=True,
                               **{**common, "seq_len": 512, "batch_size": 32, "eval_every": max(1, int(500 * scale))})
        # then a second distill step continues from the first (same samples, a new warm-up +
        # cosine, this time down to zero), in bfloat16 autocast (no faster here: with 8-wide heads
        # the step is bound by the attention kernel, not by matmuls)
        more = dataclasses.replace(config, steps=max(1, int(STAGE_TWO * scale)), min_lr=0.0, dtype="bfloat16")
        # then a third on the same samples cut into paragraphs, each BOS + paragraph as in the real
        # text and in P1 (the teacher writes newlines between paragraphs: the first two steps saw the
        # evaluation's format only in the real windows), at a lower peak rate, in float32
        para = dataclasses.replace(config, steps=max(1, int(STAGE_THREE * scale)), lr=1e-3, min_lr=0.0,
                                   generate_paragraphs=True)
        out["bar"] = 5.75
    elif section == "stories-qat":
        baseline = m.fresh()
        compress_(baseline, GPTQConfig(bits=4, strategy="channel"), data=calib)
        out["gptq_w4"] = m.metric(baseline)
        student = m.fresh()
        config = QATConfig(bits=4, strategy="channel", steps=max(1, int(1500 * scale)), lr=5e-4, generate=2000,
                           **common)
        out["start"] = None
    else:
        baseline = m.fresh()
        compress_(baseline, SparseGPTConfig(sparsity=0.5), data=calib)
        out["sparsegpt_50"] = m.metric(baseline)
        student = m.fresh()
        config = GradualConfig(sparsity=0.5, steps=max(1, int(1500 * scale)), lr=1e-3, generate=2000, end=0.6,
                               every=25, **common)
        out["start"] = None
    with tempfile.TemporaryDirectory() as scratch:
        # teacher samples are drawn once per section and shared by the sweep's runs
        samples_dir = checkpoints / section if checkpoints else Path(scratch)
        result = run_step(student, config, teacher=m.teacher, tokenizer=m.tokenizer, data=calib,
                          checkpoint_dir=checkpoints / section if checkpoints else None, generation_dir=samples_dir)
        out.update(final=m.metric(student), seconds=result["wall_seconds"], train_seconds=result["seconds"],
                   config=config.to_dict(), evals=result["evals"], settings=result["settings"])
        if "calibrated" in result:
            out.update(calibrated=result["calibrated"], final_before_temperature=without_temperature(m, student,
                                                                                               result["calibrated"]),
                       dense_calibrated=dense_with_temperature(m, config))
        if section == "stories-depth" and sweep:
            out["sweep"] = depth_sweep(m, calib, config, sweep, out, checkpoints, samples_dir)
        if section == "stories-depth":
            out["first"] = {k: out.pop(k) for k in ("final", "seconds", "train_seconds", "evals", "calibrated",
                                                    "final_before_temperature")}
            log(f"[stories-depth] first step: {out['first']}")
            result = run_step(student, more, teacher=m.teacher, tokenizer=m.tokenizer, data=calib,
                              checkpoint_dir=checkpoints / section / "second" if checkpoints else None,
                              generation_dir=samples_dir)
            out["second"] = {**calibrated_step(m, student, result), "config": more.to_dict()}
            log(f"[stories-depth] second step: {out['second']}")
            result = run_step(student, para, teacher=m.teacher, tokenizer=m.tokenizer, data=calib,
                              checkpoint_dir=checkpoints / section / "third" if checkpoints else None,
                              generation_dir=samples_dir)
            third = calibrated_step(m, student, result)
            out.update(third, third=para.to_dict(), settings=result["settings"],
                       **{k: out["first"][k] + out["second"][k] + third[k] for k in ("seconds", "train_seconds")})
            if keep is not None:
                keep.update(m=m, calib=calib, student=student, para=para, samples_dir=samples_dir)
    log(f"[{section}] {out}")
    return out


def depth_levers(scale: float, checkpoints: Path | None) -> dict[str, Any]:
    """What else might close the stories-depth gap, each measured from its final student: more steps
    of the third step's setting (the control), the same toward the teacher calibrated on the real
    text (``calibrate_teacher``), and which block was removed (the start of every choice)."""
    import copy

    from secateur import StructuredConfig, compress_

    kept: dict[str, Any] = {}
    depth = stories("stories-depth", scale, checkpoints, [], keep=kept)   # resumes from its checkpoints
    m, student, para = kept["m"], kept["student"], kept["para"]
    out: dict[str, Any] = {"dense": m.dense, "start": depth["final"], "bar": depth["bar"],
                           "dense_calibrated": depth["dense_calibrated"]["metric"]}
    log(f"[stories-depth-levers] from the stories-depth student: {depth['final']:.4f}")
    base = dataclasses.replace(para, steps=max(1, int(LEVER_STEPS * scale)), lr=5e-4,
                               eval_every=max(1, int(LEVER_STEPS * scale) // 4))
    levers = {"more steps": base, "calibrated teacher": dataclasses.replace(base, calibrate_teacher=True)}
    out["levers"], seconds = {}, 0.0
    for name, config in levers.items():
        trained = copy.deepcopy(student)
        result = run_step(trained, config, teacher=m.teacher, tokenizer=m.tokenizer, data=kept["calib"],
                          checkpoint_dir=checkpoints / "stories-depth-levers" / name.replace(" ", "-")
                          if checkpoints else None, generation_dir=kept["samples_dir"])
        out["levers"][name] = {**calibrated_step(m, trained, result), "config": config.changed(),
                               "teacher_calibrated": result.get("teacher_calibrated")}
        seconds += result["wall_seconds"]
        log(f"[stories-depth-levers] {name}: {out['levers'][name]}")
    # a bound, not a method: the logit scale that would be best on the evaluation split itself
    out["oracle_scale"] = {"student": oracle_scale(m, student), "dense": oracle_scale(m, m.fresh())}
    log(f"[stories-depth-levers] oracle scales: {out['oracle_scale']}")
    out["removed_block"] = {}
    for block in range(m.teacher.config.num_hidden_layers):   # the untrained student of every choice
        cut = m.fresh()
        compress_(cut, StructuredConfig(mlp=0.0, blocks=(block,)))
        out["removed_block"][block] = m.metric(cut)
    from secateur import lineage
    out["chosen_block"] = next(r["result"]["removed_blocks"] for r in lineage.of(student).history()
                               if r["step"]["method"] == "structured")
    out.update(final=min(v["final"] for v in out["levers"].values()), seconds=round(seconds, 1))
    return out


def oracle_scale(m: Model, model: Any, factors: tuple[float, ...] = tuple(0.96 + 0.02 * i for i in range(15))
                 ) -> dict[str, Any]:
    """The metric with the logits divided by each factor (on top of any temperature already folded
    in), scored on the evaluation split: how far any temperature could go."""
    curve = {round(factor, 2): metric_with_logits_divided(m, model, factor) for factor in factors}
    best = min(curve, key=curve.get)
    return {"factor": best, "metric": curve[best], "curve": curve}


def metric_with_logits_divided(m: Model, model: Any, factor: float) -> float:
    """The metric of ``model`` with its final norm (hence its logits) divided by ``factor``; the
    model is restored afterwards."""
    import torch

    from secateur.distill.temperature import folds_into

    weight = folds_into(model).weight   # the final norm, found through the architecture table
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(kept / factor)
        try:
            return m.metric(model)
        finally:
            weight.copy_(kept)


def calibrated_step(m: Model, student: Any, result: dict[str, Any]) -> dict[str, Any]:
    """What the stories-depth section records of one distill step that fitted a temperature."""
    return {"final": m.metric(student), "calibrated": result["calibrated"], "evals": result["evals"],
            "final_before_temperature": without_temperature(m, student, result["calibrated"]),
            "seconds": result["wall_seconds"], "train_seconds": result["seconds"]}


def without_temperature(m: Model, student: Any, calibrated: dict[str, Any]) -> float:
    """The metric of the trained student before its fitted temperature was folded in."""
    return metric_with_logits_divided(m, student, 1.0 / calibrated["temperature"])


def dense_with_temperature(m: Model, config: Any) -> dict[str, Any]:
    """The fair reference for a calibrated student: the dense model with a temperature fitted the
    same way, on the same real windows."""
    from secateur.distill.data import source_sequences
    from secateur.distill.temperature import fit_temperature

    dense = m.fresh()
    real = [seq for spec in config.data for seq in source_sequences(spec, m.tokenizer, "causal", config.seq_len)]
    fitted = fit_temperature(dense, real, batch_size=config.batch_size)
    return {**fitted, "metric": m.metric(dense)}


def one_block_removed(m: Model, calib: Any) -> Any:
    """The stories-depth student: the dense model less the block that influence ranks least."""
    from secateur import StructuredConfig, compress_

    student = m.fresh()
    compress_(student, StructuredConfig(mlp=0.0, drop_layers=1), data=calib)
    return student


def depth_sweep(m: Model, calib: Any, config: Any, sweep: list[int], main: dict[str, Any],
                checkpoints: Path | None, samples_dir: Path) -> dict[str, Any]:
    """The same student and schedule trained for fewer steps (each its own warm-up + cosine), and
    a power law ``gap = A · steps^-alpha`` fitted to the gap to the teacher, ``ln(ppl / dense)``:
    how many steps the bar would take if the curve kept its slope (no floor: the optimistic case)."""
    points = []
    for steps in sorted(set(sweep) - {config.steps}):
        student = one_block_removed(m, calib)
        short = dataclasses.replace(config, steps=steps, eval_every=0)
        result = run_step(student, short, teacher=m.teacher, tokenizer=m.tokenizer, data=calib, generation_dir=samples_dir,
                          checkpoint_dir=checkpoints / "stories-depth" / f"steps-{steps}" if checkpoints else None)
        points.append({"steps": steps, "final": m.metric(student), "seconds": result["wall_seconds"],
                       "train_seconds": result["seconds"]})
        log(f"[stories-depth] sweep: {points[-1]}")
    points.append({"steps": config.steps, "final": main["final"], "seconds": main["seconds"]})
    xs = [math.log(p["steps"]) for p in points]
    ys = [math.log(math.log(p["final"] / m.dense)) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    alpha, log_a = -slope, my - slope * mx
    needed = (math.exp((log_a - math.log(math.log(main["bar"] / m.dense))) / alpha) if alpha > 0 else None)
    per_step = max((p["train_seconds"] / p["steps"] for p in points[:-1]), default=None)  # training loop only
    fit = {"alpha": alpha, "A": math.exp(log_a), "steps_for_bar": needed, "seconds_per_step": per_step,
           "hours_for_bar": needed * per_step / 3600 if needed and per_step else None}
    log(f"[stories-depth] fit: {fit}")
    return {"points": points, "fit": fit}


def plot_curve(section: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(e["step"], e["stsb_dev"]) for e in section["evals"] if "stsb_dev" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([0] + [p[0] for p in points], [section["start"]] + [p[1] for p in points], marker="o", label="student")
    ax.axhline(section["dense"], color="gray", linestyle="--", label=f"teacher {section['dense']:.2f}")
    ax.axhline(section["bar"], color="red", linestyle=":", label=f"bar {section['bar']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("STS-B dev Spearman x 100")
    ax.set_title("MiniLM: 3-layer student distilled from the 6-layer teacher")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS + EXTRA)} (the last only when named)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (quick checks)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distill_quality.json)")
    parser.add_argument("--sweep", default="250,500,1000",
                        help="stories-depth: also train for these step counts and fit the gap's power law ('' skips)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint every 100 steps under DIR/SECTION; the same command resumes a killed run")
    args = parser.parse_args()
    setup_env()
    import json

    import torch

    torch.set_num_threads(2)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS + EXTRA]
    if bad:
        sys.exit(f"error: unknown section(s) {bad}; valid: {', '.join(SECTIONS + EXTRA)}")
    if "minilm-depth" in chosen:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("error: the minilm-depth curve is plotted with matplotlib: pip install 'secateur[plot]'")
    out_path = Path(args.out) if args.out else RESULTS / "distill_quality.json"
    results: dict[str, Any] = json.loads(out_path.read_text()).get("sections", {}) if out_path.exists() else {}
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    try:
        sweep = [max(1, int(int(n) * args.scale)) for n in args.sweep.split(",") if n.strip()]
    except ValueError:
        sys.exit(f"error: --sweep takes comma-separated step counts, got {args.sweep!r}")
    for section in chosen:
        results[section] = (minilm(section, args.scale, checkpoints) if section.startswith("minilm")
                            else depth_levers(args.scale, checkpoints) if section == "stories-depth-levers"
                            else stories(section, args.scale, checkpoints, sweep))
        write_json("distill_quality", {"environment": environment(), "sections": results}, args.out)
    if "minilm-depth" in chosen:  # its section ran now (the JSON may hold an older one)
        plot_curve(results["minilm-depth"], RESULTS / "distill_minilm_curve.png")
    rows = []
    for name, r in results.items():
        reference = r.get("gptq_w4") or r.get("sparsegpt_50")
        rows.append([name, f"{r['dense']:.3f}", r.get("start"), reference, r["final"], r.get("bar"), r["seconds"]])
    print_table("recovery training (P2: STS-B dev Spearman; P1: perplexity)",
                ["section", "dense", "start", "one-shot reference", "trained", "bar", "seconds"], rows)
    depth = results.get("stories-depth", {})
    for name, steps, following in (("first", depth.get("config", {}).get("steps"), "second step"),
                                   ("second", depth.get("second", {}).get("config", {}).get("steps"),
                                    "third step (the samples cut into paragraphs)")):
        step = depth.get(name)
        if step and "final" in step:
            print(f"stories-depth, {name} distill step ({steps} steps): {step['final_before_temperature']:.3f} "
                  f"before its temperature (tau {step['calibrated']['temperature']:.3f}), {step['final']:.3f} after; "
                  f"the {following} continues from it")
    calibrated = depth.get("calibrated")
    if calibrated:
        print(f"stories-depth: {depth['final_before_temperature']:.3f} before the temperature "
              f"fitted on the real text (tau {calibrated['temperature']:.3f}, {calibrated['tokens']} tokens), "
              f"{depth['final']:.3f} after; the dense model with a temperature fitted the same way "
              f"(tau {depth['dense_calibrated']['temperature']:.3f}): {depth['dense_calibrated']['metric']:.3f}")
    sweep_result = depth.get("sweep")
    if sweep_result:
        fit = sweep_result["fit"]
        print_table("stories-depth by training length (each run its own warm-up + cosine)",
                    ["steps", "perplexity", "gap ln(ppl/dense)", "seconds"],
                    [[p["steps"], p["final"], math.log(p["final"] / results["stories-depth"]["dense"]), p["seconds"]]
                     for p in sweep_result["points"]])
        print(f"fit: gap = {fit['A']:.3f} * steps^-{fit['alpha']:.3f}; at that slope the bar "
              f"(gap {math.log(results['stories-depth']['bar'] / results['stories-depth']['dense']):.3f}) takes about "
              f"{fit['steps_for_bar'] or float('inf'):.3g} steps, {fit['hours_for_bar'] or float('inf'):.3g} h "
              f"of training at {fit['seconds_per_step'] or float('nan'):.2f} s/step")

    levers = results.get("stories-depth-levers")
    if levers:
        print_table(f"stories-depth levers, from {levers['start']:.3f} (bar {levers['bar']})",
                    ["lever", "steps", "perplexity", "before its temperature", "change"],
                    [[name, v["config"].get("steps"), v["final"], v["final_before_temperature"],
                      f"{v['final'] / levers['start'] - 1:+.2%}"] for name, v in levers["levers"].items()])
        oracle = levers.get("oracle_scale")
        if oracle:
            student = oracle["student"]
            print(f"stories-depth: the logit scale best on the evaluation split itself (a bound, not a method): the "
                  f"row's student {student['metric']:.3f} at its temperature x {student['factor']:.2f} "
                  f"({levers['start']:.3f} at x 1); the dense model {oracle['dense']['metric']:.3f} at temperature "
                  f"{oracle['dense']['factor']:.2f} ({levers['dense']:.3f} at 1, {levers['dense_calibrated']:.3f} "
                  f"at the temperature fitted on the calibration text)")
        print_table("stories-depth, untrained, by removed block",
                    ["removed block", "perplexity", "chosen by influence"],
                    [[b, ppl, "yes" if int(b) in levers["chosen_block"] else ""]
                     for b, ppl in levers["removed_block"].items()])


if __name__ == "__main__":
    main()
