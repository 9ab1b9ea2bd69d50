"""Reference pruning run with llm-compressor (runs INSIDE benchmarks/.venv-llmc).

Loads a local causal LM, calibrates on the exact token ids that secateur wrote to a safetensors
file (tensor ``input_ids`` [n, seq_len]), runs llm-compressor's ``oneshot`` with one pruning
modifier, saves the result as a plain dense Hugging Face checkpoint (stock transformers loads it)
and writes a JSON record: wall time of the ``oneshot`` call, peak RSS, versions, settings and the
achieved sparsity of the decoder blocks' Linear weights.

This file must not import secateur: it is the independent reference.

    benchmarks/.venv-llmc/bin/python benchmarks/llmcompressor/run_prune.py \
        --model /work/shared/models/stories260K/hf --calib calib.safetensors \
        --method sparsegpt --sparsity 0.5 --out runs/llmc-sgpt50 --json runs/llmc-sgpt50.json
"""

from __future__ import annotations

import os

# Offline before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# Files that make a model directory usable by a tokenizer; copied next to the pruned weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--calib", required=True, help="safetensors file with input_ids [n, seq_len]")
    p.add_argument("--method", required=True, choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument(
        "--pattern",
        default="0:0",
        help='N:M mask structure, e.g. "2:4" or "4:8"; "0:0" (default) is unstructured',
    )
    p.add_argument("--out", required=True, help="directory for the pruned dense checkpoint")
    p.add_argument("--json", required=True, help="where to write the result record")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--nsamples", type=int, default=None, help="use the first N windows only")
    # SparseGPT knobs (llm-compressor defaults), exposed to investigate differences.
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT block_size")
    p.add_argument(
        "--pipeline",
        default=None,
        help="llm-compressor calibration pipeline (default: its own, 'independent', which "
        "infers 'sequential' for calibrated modifiers)",
    )
    p.add_argument(
        "--no-propagate-error",
        action="store_true",
        help="sequential pipeline: feed the next block the dense (not pruned) outputs",
    )
    return p.parse_args(argv)


def check_pattern(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise SystemExit(f"--pattern must look like N:M (e.g. 2:4, 0:0), got {pattern!r}") from None
    if (n, m) != (0, 0) and not (0 < n < m):
        raise SystemExit(f"--pattern {pattern!r}: need 0 < N < M, or 0:0 for unstructured")
    return n, m


def load_calibration(path: str, nsamples: int | None) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "input_ids" not in tensors:
        raise SystemExit(f"{path}: no tensor named 'input_ids' (found {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be [n, seq_len], got shape {tuple(ids.shape)}")
    if nsamples is not None:
        ids = ids[:nsamples]
    return ids.long()


def calibration_loader(input_ids: torch.Tensor):
    """The calibration windows as the DataLoader oneshot would build from a tokenized dataset.

    A datasets.Dataset with ``input_ids`` and an all-ones ``attention_mask`` per window, batch 1,
    windows in file order (no shuffle), collated with transformers' ``default_data_collator``
    (what llm-compressor's truncation collator ends in; every window has the same length, so
    nothing is truncated). Passing the DataLoader skips llm-compressor's text processing, which
    the pre-tokenized windows do not need.
    """
    from datasets import Dataset
    from torch.utils.data import DataLoader, SequentialSampler
    from transformers import default_data_collator

    ids = input_ids.tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    return DataLoader(ds, batch_size=1, sampler=SequentialSampler(ds),
                      collate_fn=default_data_collator)


class NoProcessor:
    """Stands in for a tokenizer when the model directory has none (the P4 timing model).

    oneshot insists on a processor whenever a dataset is given, but with a ready DataLoader it
    never calls it (it is only used to tokenize text and to be saved next to output_dir, which
    this script does not pass).
    """

    def __repr__(self) -> str:
        return "NoProcessor()"


def load_processor(model_dir: Path):
    has_tokenizer = any((model_dir / f).exists()
                        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tokenizer:
        return NoProcessor()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def build_modifier(args: argparse.Namespace, n: int, m: int):
    ignore = ["re:.*lm_head"]
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(
            sparsity=args.sparsity,
            mask_structure=args.pattern,
            block_size=args.block_size,
            dampening_frac=args.dampening,
            targets=["Linear"],
            ignore=ignore,
        )
    if args.method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(
            sparsity=args.sparsity, mask_structure=args.pattern, targets=["Linear"], ignore=ignore
        )
    # magnitude: llm-compressor's MagnitudePruningModifier is a training-time (scheduled)
    # modifier, driven by magnitude_lifecycle() below instead of oneshot. start=0, end=1 puts
    # step 0 inside [start, end), so initialize computes the masks (init == final sparsity,
    # per weight matrix, by |W|) and the one fake training step applies them.
    if (n, m) != (0, 0):
        raise SystemExit(
            "--method magnitude supports only --pattern 0:0 here: llm-compressor's mask factory "
            "knows unstructured, channel, filter and block_* masks, not N:M")
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier

    return MagnitudePruningModifier(
        targets=[r"re:.*layers\.\d+\..*(proj|fc\d?|dense)$"],
        init_sparsity=args.sparsity,
        final_sparsity=args.sparsity,
        start=0,
        end=1,
        update=1,
        mask_structure="unstructured",
    )


def magnitude_lifecycle(model: torch.nn.Module, modifier) -> None:
    """Apply llm-compressor's MagnitudePruningModifier once, through its session lifecycle.

    In llm-compressor 0.14 this modifier is training-time only: under ``oneshot`` (datafree
    pipeline) it computes its masks but applies them only on an optimizer step, so the weights
    come back dense (measured: sparsity 0.0). Here the lifecycle a trainer would drive is
    driven by hand: initialize (masks computed from |W| at step 0), the events of one training
    step with no gradient (OPTIM_POST_STEP runs ``apply_mask_weight``: W *= mask), finalize
    (masks removed, zeros stay).
    """
    from llmcompressor.core import active_session
    from llmcompressor.core.session_functions import LifecycleCallbacks

    session = active_session()
    session.reset()
    session.initialize(model=model, recipe=modifier, start=0)
    LifecycleCallbacks.batch_start()  # the lifecycle insists on a full step's event order
    LifecycleCallbacks.optim_pre_step()
    LifecycleCallbacks.optim_post_step()
    LifecycleCallbacks.batch_end()
    session.finalize()


def decoder_block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Linear layers inside the decoder blocks (names containing 'layers.<i>.')."""
    import re

    pat = re.compile(r"(^|\.)layers\.\d+\.")
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and pat.search(name)
    }


def sparsity_report(model: torch.nn.Module, n: int, m: int) -> dict:
    linears = decoder_block_linears(model)
    zeros = total = 0
    by_kind: dict[str, list[int]] = {}
    nm_ok = True
    for name, mod in linears.items():
        w = mod.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        kind = name.rsplit(".", 1)[-1]
        acc = by_kind.setdefault(kind, [0, 0])
        acc[0] += z
        acc[1] += w.numel()
        if (n, m) != (0, 0) and w.shape[1] % m == 0:
            nonzero_per_group = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
            nm_ok &= bool((nonzero_per_group <= m - n).all())
    return {
        "layers": len(linears),
        "params": total,
        "zeros": zeros,
        "sparsity": zeros / total if total else float("nan"),
        "by_projection": {k: v[0] / v[1] for k, v in sorted(by_kind.items())},
        **({"n_m_pattern_holds": nm_ok} if (n, m) != (0, 0) else {}),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "compressed-tensors", "llmcompressor", "datasets",
                "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def peak_rss_bytes() -> int:
    # VmHWM: this process's own peak (ru_maxrss carries the parent's over execve on Linux)
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is KiB on Linux (bytes on macOS).
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def save_dense(model, out: Path, model_dir: Path) -> dict:
    """Save as a plain dense checkpoint; strip compressed-tensors metadata if any was added."""
    out.mkdir(parents=True, exist_ok=True)
    # oneshot wraps save_pretrained; save_compressed=False keeps dense tensors.
    if getattr(model.save_pretrained, "_overridden", False):
        model.save_pretrained(str(out), save_compressed=False)
    else:
        model.save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    stripped = {}
    for key in ("quantization_config", "compression_config", "sparsity_config"):
        if key in cfg:
            stripped[key] = cfg.pop(key)
    if stripped:
        # Stock transformers would route a compressed-tensors quantization_config to the
        # compressed-tensors quantizer; the weights are dense, so keep the metadata aside.
        (out / "llmcompressor_config.json").write_text(json.dumps(stripped, indent=2))
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.exists() and not (out / name).exists():
            shutil.copy2(src, out / name)
    return {"stripped_config_keys": sorted(stripped)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n, m = check_pattern(args.pattern)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM
    from llmcompressor import oneshot

    model_dir = Path(args.model)
    input_ids = load_calibration(args.calib, args.nsamples)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    dense = sparsity_report(model, n, m)

    modifier = build_modifier(args, n, m)
    kwargs = dict(model=model, recipe=modifier)
    if args.method != "magnitude":
        kwargs.update(
            dataset=calibration_loader(input_ids),
            processor=load_processor(model_dir),
            num_calibration_samples=input_ids.shape[0],
            propagate_error=not args.no_propagate_error,
        )
        if args.pipeline:
            kwargs["pipeline"] = args.pipeline

    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    if args.method == "magnitude":
        magnitude_lifecycle(model, modifier)
    else:
        model = oneshot(**kwargs)
    oneshot_s = time.perf_counter() - t0
    rss_after = peak_rss_bytes()

    achieved = sparsity_report(model, n, m)
    out = Path(args.out)
    t0 = time.perf_counter()
    save_info = save_dense(model, out, model_dir)
    save_s = time.perf_counter() - t0

    record = {
        "tool": "llmcompressor",
        "method": args.method,
        "sparsity_target": args.sparsity,
        "pattern": args.pattern,
        "settings": {
            "model": str(model_dir),
            "calibration_file": str(args.calib),
            "calibration_windows": int(input_ids.shape[0]),
            "calibration_seq_len": int(input_ids.shape[1]),
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            "device": "cpu",
            "modifier": type(modifier).__name__,
            "modifier_args": json.loads(modifier.model_dump_json(
                include={"sparsity", "mask_structure", "block_size", "dampening_frac",
                         "targets", "ignore", "init_sparsity", "final_sparsity"})),
            "pipeline": args.pipeline or "default (independent -> sequential if calibrated)",
            "propagate_error": not args.no_propagate_error,
            "calibration_order": "file order (no shuffle)",
            "batch_size": 1,
        },
        "load_s": load_s,
        "oneshot_wall_s": oneshot_s,
        "entry_point": ("session lifecycle: initialize + one training step's events + finalize"
                        if args.method == "magnitude" else "llmcompressor.oneshot"),
        "save_s": save_s,
        "peak_rss_bytes": rss_after,
        "peak_rss_gib": rss_after / 2**30,
        "peak_rss_before_oneshot_bytes": rss_before,
        "sparsity_before": dense["sparsity"],
        "achieved": achieved,
        "out": str(out),
        **save_info,
        "versions": versions(),
        "host": {"cpu": cpu_model(), "nproc": os.cpu_count()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"llmcompressor {args.method} sparsity={args.sparsity} pattern={args.pattern}: "
        f"oneshot {oneshot_s:.1f} s, peak RSS {rss_after / 2**30:.2f} GiB, "
        f"achieved block-Linear sparsity {achieved['sparsity']:.4f} -> {out}"
    )
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
