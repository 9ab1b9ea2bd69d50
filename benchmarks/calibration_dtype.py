"""The quality cost of running calibration forwards in bfloat16 instead of float32.

P1 on stories260K (calibration: the 128 × 256 P1 windows), Wanda and SparseGPT at 50% and 2:4,
each with ``compute_dtype`` float32 and bfloat16, in one run.

    python benchmarks/calibration_dtype.py

Prints a table and writes benchmarks/results/calibration_dtype.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402


def main() -> None:
    setup_env()
    import secateur
    from secateur.api import get_method
    from secateur.data import calibration_set
    from secateur.evaluate import evaluate

    stories = SHARED / "models" / "stories260K" / "hf"
    _, tokenizer, _ = secateur.load(stories)
    calib = calibration_set("tinystories", tokenizer, 128, 256)
    rows, runs = [], []
    for method in ("wanda", "sparsegpt"):
        for label, fields in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
            values = {}
            for dtype in ("float32", "bfloat16"):
                model, tokenizer, _ = secateur.load(stories)
                start = time.perf_counter()
                secateur.compress_(model, get_method(method).config(**fields, compute_dtype=dtype), data=calib)
                seconds = time.perf_counter() - start
                values[dtype] = evaluate(model, tokenizer, "perplexity", "tinystories").value
                runs.append({"method": method, "setting": label, "compute_dtype": dtype, "ppl": values[dtype],
                             "seconds": seconds})
            rows.append([method, label, values["float32"], values["bfloat16"], values["bfloat16"] / values["float32"]])
    print_table("P1 perplexity after pruning: calibration forwards in float32 vs bfloat16",
                ["method", "setting", "float32", "bfloat16", "bf16 / fp32"], rows)
    print(f"wrote {write_json('calibration_dtype', {'environment': environment(), 'runs': runs})}")


if __name__ == "__main__":
    main()
