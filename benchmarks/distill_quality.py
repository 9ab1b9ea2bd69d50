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
  stories-depth one of 5 blocks removed by influence, then distilled (KL) on 512-token windows;
                bar ≤ 5.75.
  stories-qat   W4 per-channel QAT (learnable scales, KL from the fp32 model) vs GPTQ W4 on the
                128 × 256 P1 calibration windows; bar: QAT below GPTQ.
  stories-gradual  50% unstructured sparsity reached gradually while distilling vs one-shot
                SparseGPT 50%; bar: gradual below SparseGPT.

    python benchmarks/distill_quality.py [--only minilm-depth,stories-qat] [--scale 1.0] [--checkpoint-dir DIR]

Prints a table and writes benchmarks/results/distill_quality.json (+ distill_minilm_curve.png).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SHARED, environment, print_table, setup_env, write_json  # noqa: E402

MINILM_DATA = ("stsb:train", "wikitext2:validation", "c4")
STORIES_DATA = ("tinystories:calibration",)
SECTIONS = ("minilm-depth", "minilm-mlp50", "stories-depth", "stories-qat", "stories-gradual")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_step(model: Any, config: Any, *, teacher: Any, tokenizer: Any, data: Any = None,
             evaluate: Any = None, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """One registered step with an extra per-evaluation metric (the curve); with a checkpoint
    directory the training checkpoints there and a re-run resumes from it."""
    from secateur.api import Context, get_method

    extra = {"tokenizer": tokenizer, "evaluate": evaluate}
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        extra["checkpoint_dir"] = checkpoint_dir
    ctx = Context(data=data, teacher=teacher, extra=extra)
    start = time.perf_counter()
    result = get_method(config.method).apply(model, config, ctx)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["history_full"] = [h.to_dict()["history"] for h in ctx.extra["training"]][-1]
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
    report = student.secateur_history[-1]["result"]
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


def stories(section: str, scale: float, checkpoints: Path | None) -> dict[str, Any]:
    from secateur import DistillConfig, GPTQConfig, GradualConfig, QATConfig, SparseGPTConfig, StructuredConfig, compress_
    from secateur.data import calibration_set

    m = Model(SHARED / "models" / "stories260K" / "hf", "perplexity", "tinystories", {})
    calib = calibration_set("tinystories", m.tokenizer, 128, 256)
    common = dict(data=STORIES_DATA, seq_len=256, batch_size=16, eval_every=0, checkpoint_every=100 if checkpoints else 0,
                  holdout=0.05,
                  temperature=1.0)
    out: dict[str, Any] = {"dense": m.dense}
    if section == "stories-depth":
        student = m.fresh()
        compress_(student, StructuredConfig(mlp=0.0, drop_layers=1), data=calib)
        out["start"] = m.metric(student)
        # 512-token windows, the length P1 scores: a student trained on 256 only loses the
        # teacher's behaviour past about position 400; 30000 samples read about 3 times each
        config = DistillConfig(steps=max(1, int(3000 * scale)), lr=3e-3, generate=30000,
                               **{**common, "seq_len": 512, "batch_size": 32, "eval_every": max(1, int(500 * scale))})
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
    result = run_step(student, config, teacher=m.teacher, tokenizer=m.tokenizer, data=calib,
                      checkpoint_dir=checkpoints / section if checkpoints else None)
    out.update(final=m.metric(student), seconds=result["wall_seconds"], config=config.to_dict(),
               evals=result["evals"], settings=result["settings"])
    log(f"[{section}] {out}")
    return out


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
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (quick checks)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distill_quality.json)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint every 100 steps under DIR/SECTION; the same command resumes a killed run")
    args = parser.parse_args()
    setup_env()
    import json

    import torch

    torch.set_num_threads(2)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        sys.exit(f"error: unknown section(s) {bad}; valid: {', '.join(SECTIONS)}")
    if "minilm-depth" in chosen:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("error: the minilm-depth curve is plotted with matplotlib: pip install 'secateur[plot]'")
    out_path = Path(args.out) if args.out else RESULTS / "distill_quality.json"
    results: dict[str, Any] = json.loads(out_path.read_text()).get("sections", {}) if out_path.exists() else {}
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    for section in chosen:
        results[section] = (minilm if section.startswith("minilm") else stories)(section, args.scale, checkpoints)
        write_json("distill_quality", {"environment": environment(), "sections": results}, args.out)
    if "minilm-depth" in results:
        plot_curve(results["minilm-depth"], RESULTS / "distill_minilm_curve.png")
    rows = []
    for name, r in results.items():
        reference = r.get("gptq_w4") or r.get("sparsegpt_50")
        rows.append([name, f"{r['dense']:.3f}", r.get("start"), reference, r["final"], r.get("bar"), r["seconds"]])
    print_table("recovery training (P2: STS-B dev Spearman; P1: perplexity)",
                ["section", "dense", "start", "one-shot reference", "trained", "bar", "seconds"], rows)


if __name__ == "__main__":
    main()
