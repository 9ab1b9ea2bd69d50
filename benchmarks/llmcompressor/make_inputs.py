"""Write the inputs that secateur and llm-compressor share (runs in the secateur venv).

    stories   P1 calibration for stories260K: 128 consecutive 256-token windows from the
              TinyStories calibration split (first 430 paragraphs), via secateur.data.
    timing    P4 timing model (random Llama, hidden 768, intermediate 2048, 12 layers, 12 heads,
              vocab 32000, seed 0) saved with save_pretrained, and 64 random windows of 512
              tokens (torch.randint(0, 32000) with a generator seeded 0).

Both files hold one tensor, ``input_ids`` [n, seq_len] int64, so both tools calibrate on
identical tokens. Usage (defaults write under benchmarks/.cache/):

    SECATEUR_DATA_DIR=/work/shared/data HF_HUB_OFFLINE=1 \
        /work/venv/bin/python benchmarks/llmcompressor/make_inputs.py stories timing
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = Path(__file__).resolve().parent.parent / ".cache"
STORIES_MODEL = Path("/work/shared/models/stories260K/hf")


def write_ids(path: Path, input_ids, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": input_ids.contiguous()}, str(path), metadata={k: str(v) for k, v in meta.items()})
    print(f"wrote {path}  input_ids {tuple(input_ids.shape)}  {meta}")


def stories(cache: Path, model_dir: Path, n: int, seq_len: int) -> None:
    from transformers import AutoTokenizer

    from secateur.data import calibration_set

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cs = calibration_set("tinystories", tok, n_samples=n, seq_len=seq_len, mode="consecutive")
    meta = {"source": "tinystories calibration split (first 430 paragraphs)", "mode": "consecutive",
            "tokenizer": str(model_dir)}
    fp = getattr(cs, "fingerprint", None)
    if fp:
        meta["fingerprint"] = fp
    write_ids(cache / f"stories260K-calib-{n}x{seq_len}.safetensors", cs.input_ids, meta)


def timing(cache: Path, n: int, seq_len: int) -> None:
    import torch

    from secateur.testing import timing_model

    out = cache / "timing-model"
    if not (out / "config.json").exists():
        model = timing_model(seed=0)
        model.save_pretrained(str(out))
        (out / "ORIGIN.json").write_text(json.dumps(
            {"built_by": "secateur.testing.timing_model(seed=0)", "protocol": "P4"}, indent=2) + "\n")
        print(f"wrote {out}")
    else:
        print(f"kept {out}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (n, seq_len), generator=g, dtype=torch.long)
    write_ids(cache / f"timing-calib-{n}x{seq_len}.safetensors", ids,
              {"source": "torch.randint(0, 32000) generator seed 0", "protocol": "P4"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="+", choices=["stories", "timing"])
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--model", type=Path, default=STORIES_MODEL, help="stories260K HF dir (tokenizer)")
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    gitignore = args.cache / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n")  # generated data, never committed
    if "stories" in args.what:
        stories(args.cache, args.model, 128, 256)
    if "timing" in args.what:
        timing(args.cache, 64, 512)


if __name__ == "__main__":
    main()
