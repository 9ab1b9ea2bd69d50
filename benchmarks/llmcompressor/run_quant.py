"""Reference weight-quantization run with llm-compressor (runs INSIDE benchmarks/.venv-llmc).

Loads a local causal LM, runs llm-compressor's ``oneshot`` with one quantization modifier and
writes a JSON record: wall time of the ``oneshot`` call, peak RSS, versions and settings (the
resolved quantization config included). The model is saved compressed (compressed-tensors,
``save_compressed=True``) next to a copy of the tokenizer files, so it can be evaluated.

    --method rtn    QuantizationModifier (round to nearest; data-free, the datafree pipeline)
    --method gptq   GPTQModifier (calibrates on the exact token ids of --calib, a safetensors
                    file with one tensor ``input_ids`` [n, seq_len]; sequential pipeline)

    --scheme W4A16          the preset: int4 symmetric weights, group 128, activations untouched
    --scheme W4A16-channel  config_groups: int4 symmetric, strategy channel (one scale per row)
    --scheme W3A16-channel  config_groups: int3 symmetric, strategy channel
    --scheme W8A16-channel  config_groups: int8 symmetric, strategy channel

Targets ``Linear``, ignores ``lm_head``. This file must not import secateur: it is the
independent reference.

    benchmarks/.venv-llmc/bin/python benchmarks/llmcompressor/run_quant.py \
        --model /work/shared/models/stories260K/hf --calib calib.safetensors \
        --method gptq --scheme W4A16-channel --out runs/llmc-gptq-w4 --json runs/llmc-gptq-w4.json
"""

from __future__ import annotations

import os

# Offline before any Hugging Face import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Shared helpers of the pruning runner (same venv, same rules: no secateur import).
from run_prune import (  # noqa: E402
    TOKENIZER_FILES,
    calibration_loader,
    cpu_model,
    load_calibration,
    load_processor,
    peak_rss_bytes,
    versions,
)

SCHEMES = {
    # name: (preset name or None, bits, strategy, group_size)
    "W4A16": ("W4A16", 4, "group", 128),
    "W4A16-channel": (None, 4, "channel", None),
    "W3A16-channel": (None, 3, "channel", None),
    "W8A16-channel": (None, 8, "channel", None),
}
IGNORE = ["lm_head"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--calib", default=None, help="safetensors file with input_ids [n, seq_len] (gptq)")
    p.add_argument("--method", required=True, choices=["rtn", "gptq"])
    p.add_argument("--scheme", default="W4A16", choices=sorted(SCHEMES))
    p.add_argument("--out", default=None, help="directory for the compressed checkpoint (omit: not saved)")
    p.add_argument("--json", required=True, help="where to write the result record")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--nsamples", type=int, default=None, help="use the first N windows only")
    # GPTQ knobs (llm-compressor 0.14 defaults), exposed to investigate differences.
    p.add_argument("--dampening", type=float, default=0.01, help="GPTQ dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block_size")
    p.add_argument(
        "--actorder",
        default="default",
        choices=["default", "weight", "none"],
        help="GPTQ activation ordering: 'default' leaves llm-compressor's (0.14: static, i.e. "
        "'weight': columns by decreasing Hessian diagonal, scales fixed from the original "
        "weights); 'none' quantizes columns in order",
    )
    p.add_argument("--weight-observer", default=None,
                   help="override the weights observer (llm-compressor default: minmax)")
    p.add_argument("--pipeline", default=None, help="llm-compressor calibration pipeline (default: its own)")
    return p.parse_args(argv)


def build_modifier(args: argparse.Namespace):
    preset, bits, strategy, group_size = SCHEMES[args.scheme]
    common: dict = {"targets": ["Linear"], "ignore": list(IGNORE)}
    if preset is not None:
        common["scheme"] = preset
    else:
        common.pop("targets")  # the config group carries the targets
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy}
        if group_size:
            weights["group_size"] = group_size
        common["config_groups"] = {
            "group_0": {"targets": ["Linear"], "weights": weights,
                        "input_activations": None, "output_activations": None}
        }
    if args.weight_observer:
        common["weight_observer"] = args.weight_observer
    if args.method == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(**common)
    from llmcompressor.modifiers.gptq import GPTQModifier

    extra: dict = {"block_size": args.block_size, "dampening_frac": args.dampening}
    if args.actorder == "weight":
        extra["actorder"] = "weight"
    elif args.actorder == "none":
        extra["actorder"] = None
    return GPTQModifier(**common, **extra)


def resolved(modifier) -> dict:
    """The quantization config llm-compressor resolves from the modifier (what it applies)."""
    try:
        cfg = modifier.resolved_config
        return json.loads(cfg.model_dump_json(exclude_none=True))
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": repr(exc)}


def quantized_modules(model: torch.nn.Module) -> dict:
    names, kinds = [], {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is not None and getattr(scheme, "weights", None) is not None:
            names.append(name)
            kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
    return {"count": len(names), "by_class": kinds, "first": names[:3], "lm_head_quantized": any(
        n.endswith("lm_head") for n in names)}


def save_compressed(model, out: Path, model_dir: Path) -> dict:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), save_compressed=True)
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.exists() and not (out / name).exists():
            shutil.copy2(src, out / name)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    weights_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"format": qc.get("format"), "quant_method": qc.get("quant_method"),
            "weights_bytes": weights_bytes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.method == "gptq" and not args.calib:
        raise SystemExit("--method gptq needs --calib")

    from transformers import AutoModelForCausalLM
    from llmcompressor import oneshot

    model_dir = Path(args.model)
    input_ids = load_calibration(args.calib, args.nsamples) if args.calib else None
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    modifier = build_modifier(args)
    kwargs = dict(model=model, recipe=modifier)
    if args.method == "gptq":
        kwargs.update(
            dataset=calibration_loader(input_ids),
            processor=load_processor(model_dir),
            num_calibration_samples=input_ids.shape[0],
        )
    if args.pipeline:
        kwargs["pipeline"] = args.pipeline

    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    model = oneshot(**kwargs)
    oneshot_s = time.perf_counter() - t0
    rss_after = peak_rss_bytes()

    qmods = quantized_modules(model)
    save_info, save_s = {}, None
    if args.out:
        t0 = time.perf_counter()
        save_info = save_compressed(model, Path(args.out), model_dir)
        save_s = time.perf_counter() - t0

    preset, bits, strategy, group_size = SCHEMES[args.scheme]
    include = {"targets", "ignore", "scheme", "config_groups", "weight_observer"}
    if args.method == "gptq":
        include |= {"block_size", "dampening_frac", "actorder"}
    record = {
        "tool": "llmcompressor",
        "method": args.method,
        "scheme": args.scheme,
        "settings": {
            "model": str(model_dir),
            "calibration_file": str(args.calib) if args.calib else None,
            "calibration_windows": int(input_ids.shape[0]) if input_ids is not None else 0,
            "calibration_seq_len": int(input_ids.shape[1]) if input_ids is not None else None,
            "calibration_used": args.method == "gptq",
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            "device": "cpu",
            "bits": bits,
            "strategy": strategy,
            "group_size": group_size,
            "symmetric": True,
            "modifier": type(modifier).__name__,
            "modifier_args": json.loads(modifier.model_dump_json(include=include)),
            "resolved_config": resolved(modifier),
            "pipeline": args.pipeline or ("default (independent -> sequential)" if args.method == "gptq"
                                          else "default (independent -> datafree)"),
            "calibration_order": "file order (no shuffle)",
            "batch_size": 1,
        },
        "load_s": load_s,
        "oneshot_wall_s": oneshot_s,
        "entry_point": "llmcompressor.oneshot",
        "save_s": save_s,
        "peak_rss_bytes": rss_after,
        "peak_rss_gib": rss_after / 2**30,
        "peak_rss_before_oneshot_bytes": rss_before,
        "quantized_modules": qmods,
        "out": args.out,
        "saved": save_info,
        "versions": versions(),
        "host": {"cpu": cpu_model(), "nproc": os.cpu_count()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(
        f"llmcompressor {args.method} {args.scheme}: oneshot {oneshot_s:.1f} s, peak RSS "
        f"{rss_after / 2**30:.2f} GiB, {qmods['count']} quantized modules"
        + (f" -> {args.out} ({save_info.get('format')})" if args.out else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
