"""Quantized Linear kernels, protocol P4 on the timing model: fp32 vs W8A8 / W4A16 / W8A16 in one run.

The P4 timing model (random Llama, hidden 768, intermediate 2048, 12 layers, vocab 32000, fp32)
with every Linear of the blocks and the lm_head replaced by a QuantLinear built from a plain
symmetric round-to-nearest of its weight (local helper: W8 per channel for W8A8 and W8A16, W4
group 128 for W4A16), timed in alternating rounds with secateur's P4 evaluator (batch 1, prompt
128 tokens, 64 greedy tokens with the KV cache). Speed-ups are medians over rounds of per-round
ratios to fp32.

Two more columns explain the numbers:

* the bandwidth limit: bytes of weights one decode step reads (blocks and head, as the kernels
  store them) ÷ the streaming bandwidth measured here (``sum`` over a buffer of that many bytes,
  so cache effects match), as tokens/s, and the fraction of it achieved;
* "rest of the step": the same model with every Linear replaced by a stand-in that costs nothing
  (it returns zeros): attention, norms, KV-cache growth and Python — the floor no Linear kernel
  removes. "Linear ms" is a variant's ms/token minus that floor, "Linear of limit" the bandwidth
  limit's share of it (1.0 = the Linears stream their weights at the measured bandwidth).

    python benchmarks/quant_kernels.py [--rounds 3] [--threads 2] [--prompt 128] [--new 64] [--profile]

Prints a table and writes benchmarks/results/quant_kernels.json. Targets (issue): decode tokens/s
W8A8 >= 4x fp32 and W4A16 >= 4.5x fp32 at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_p4_arguments, environment, print_table, setup_env, write_json  # noqa: E402

VARIANTS = {  # name -> (bits, group_size, activation); None = the fp32 model
    "fp32": None,
    "W8A8": (8, None, "int8"),
    "W4A16 g128": (4, 128, None),
    "W8A16": (8, None, None),
}
TARGETS = {"W8A8": 4.0, "W4A16 g128": 4.5}  # decode x fp32 (the compiled runtime)
PREFILL_TARGETS = {"W8A8": 2.5}  # prefill x fp32
FLOOR = "rest of the step"


def rtn(weight, bits: int, group: int | None):
    """Symmetric round-to-nearest: (q int8 [out, in], scale [out, groups]) with w ≈ q * scale."""
    import torch

    out, cols = weight.shape
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(out, -1, group or cols)
    scale = (w.abs().amax(-1) / qmax).clamp_min(1e-12)
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
    return q.reshape(out, cols), scale


def linears(model):
    """Every nn.Linear of the blocks and the lm_head: {name: module}."""
    import torch.nn as nn

    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def swap(model, make) -> None:
    for name, module in linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(module))


def quantized(dense, bits: int, group: int | None, activation: str | None):
    from secateur.runtime.linear import QuantLinear

    model = copy.deepcopy(dense)

    def make(linear):
        q, scale = rtn(linear.weight, bits, group)
        return QuantLinear.from_quantized(q, scale, None, bits, group, linear.bias, activation)

    swap(model, make)
    return model


def floor_model(dense):
    """Every Linear returns its input's first feature repeated to its output width: the decode step
    without any Linear work. (Constant zeros would let the compiler delete the attention, whose
    inputs would then be known; this keeps every other op of the step live.)"""
    import torch.nn as nn

    class Free(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.out_features = linear.out_features

        def forward(self, x):
            return x[..., :1].expand(*x.shape[:-1], self.out_features).contiguous()

    model = copy.deepcopy(dense)
    swap(model, Free)
    return model


def decode_bytes(model) -> int:
    """Bytes of Linear weights one decode step reads, in the layout its kernel reads them."""
    import torch.nn as nn

    from secateur.runtime import kernels
    from secateur.runtime.linear import QuantLinear

    total = 0
    for module in model.modules():
        if not isinstance(module, (nn.Linear, QuantLinear)):
            continue
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        else:
            n, k = module.out_features, module.in_features
            kernel = module.kernel_for(1)  # the decode step's kernel, as measured on this machine
            if module.op == "w8a8" and kernel != "fp32":
                total += n * k + (8 if kernel == "gemv" else 4) * n  # int8 weight, fp32 scale (+ int32 row sums)
            elif kernel == "gemv":
                total += n * k // 2 + 8 * n * (k // module.packed("gemv").group)  # nibbles, fp32 (s, s * (136 + zp))
            elif kernel == "int4pack":
                total += n * k // 2 + 4 * n * (k // kernels.int4_group(module.group_size, k))  # nibbles, bf16 (s, z)
            elif kernel == "int8pack":
                total += n * k + 2 * n  # int8 weight, bf16 scale
            elif kernel == "fp32":
                total += 4 * n * k  # the dequantized float32 weight
            else:
                total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of ``sum`` streaming a float32 buffer of ``nbytes`` (best of ``repeats`` passes)."""
    import torch

    buffer = torch.ones(max(nbytes // 4, 1))
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def kernel_error(model, ids) -> float:
    """max |logits(kernels) - logits(reference path)| / max |logits(reference path)| on ``ids``. For
    W8A8 a single layer agrees to ~1e-7, but float-rounding differences flip a few activation
    roundings in the next layers' per-token quantization, which compounds over 12 blocks."""
    import torch

    from secateur.runtime.linear import reference_only

    with torch.inference_mode():
        fast = model(input_ids=ids).logits
        with reference_only():
            ref = model(input_ids=ids).logits
    return float((fast - ref).abs().max() / ref.abs().max())


def profile(model, prompt, new: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from secateur.evaluate.speed import greedy_decode

    greedy_decode(model, prompt, 4)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        greedy_decode(model, prompt, new)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_p4_arguments(parser, "quant_kernels")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one decode per variant")
    parser.add_argument("--compile", action="store_true",
                        help="time every variant (fp32 too) compiled: static KV cache + torch.compile (max-autotune)")
    args = parser.parse_args()
    setup_env()
    import torch

    from secateur.evaluate.speed import speed
    from secateur.testing import timing_model

    torch.set_num_threads(args.threads)
    dense = timing_model(seed=0)
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    models, info = {}, {}
    for name, scheme in VARIANTS.items():
        model = dense if scheme is None else quantized(dense, *scheme)
        models[name] = model
        info[name] = {"scheme": scheme, "decode_bytes": decode_bytes(model),
                      "kernel_vs_reference": kernel_error(model, ids) if scheme else None}
        print(f"built {name}: {info[name]['decode_bytes'] / 2**20:.1f} MiB read per decode step", file=sys.stderr)
    models[FLOOR] = floor_model(dense)
    info[FLOOR] = {"scheme": None, "decode_bytes": 0, "kernel_vs_reference": None}

    compiled = {}
    if args.compile:  # one compiled runtime per variant, compiled in its first warm-up, reused every round
        from secateur.runtime.compiled import CompiledLM

        compiled = {name: CompiledLM(model, args.prompt + args.new) for name, model in models.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():  # alternate: every round times every variant
            res = speed(model, prompt_len=args.prompt, new_tokens=args.new, runs=args.runs,
                        compile=compiled.get(name, False))
            nbytes = info[name]["decode_bytes"]
            info[name]["kernels"] = res.settings.get("kernels", {})  # chosen by measurement, by token bucket
            rounds[name].append({"prefill_ms": res.extra["prefill_ms_median"],
                                 "decode_tokens_per_s": res.extra["decode_tokens_per_s"],
                                 "bandwidth_gb_s": bandwidth(nbytes) / 1e9 if nbytes else None})
            print(f"round {r}: {name}: prefill {res.extra['prefill_ms_median']:.1f} ms, "
                  f"decode {res.extra['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
        settings = res.settings

    rows, results = [], {}
    base = rounds["fp32"]
    floor_ms = 1000 / statistics.median(x["decode_tokens_per_s"] for x in rounds[FLOOR])
    for name in models:
        runs = rounds[name]
        prefill = statistics.median(x["prefill_ms"] for x in runs)
        decode = statistics.median(x["decode_tokens_per_s"] for x in runs)
        prefill_x = statistics.median(b["prefill_ms"] / x["prefill_ms"] for b, x in zip(base, runs))
        decode_x = statistics.median(x["decode_tokens_per_s"] / b["decode_tokens_per_s"] for b, x in zip(base, runs))
        nbytes = info[name]["decode_bytes"]
        bw = statistics.median(x["bandwidth_gb_s"] for x in runs) if nbytes else None
        limit = bw * 1e9 / nbytes if nbytes else None
        linear_ms = 1000 / decode - floor_ms if nbytes else None  # the step's time beyond the floor
        results[name] = {**info[name], "rounds": runs, "prefill_ms_median": prefill,
                         "decode_tokens_per_s_median": decode, "prefill_speedup": prefill_x, "decode_speedup": decode_x, "decode_ms_per_token": 1000 / decode,
                         "linear_ms_per_token": linear_ms, "bandwidth_gb_s": bw, "bandwidth_limit_tokens_per_s": limit,
                         "fraction_of_limit": decode / limit if limit else None,
                         "linear_fraction_of_limit": 1000 / limit / linear_ms if limit else None}
        rows.append([name, f"{nbytes / 2**20:.0f}" if nbytes else "—", prefill, prefill_x, decode, decode_x,
                     1000 / decode, linear_ms, bw, limit, results[name]["fraction_of_limit"],
                     results[name]["linear_fraction_of_limit"]])
    runtime = "compiled (static KV cache, torch.compile max-autotune, freezing)" if args.compile else "eager"
    print_table(f"P4 timing model, {runtime}, batch 1, prompt {args.prompt}, {args.new} new tokens, "
                f"{args.threads} threads, {args.rounds} alternating rounds",
                ["variant", "MiB/step", "prefill ms", "prefill ×", "decode tok/s", "decode ×", "ms/token",
                 "Linear ms", "GB/s", "limit tok/s", "of limit", "Linear of limit"], rows)
    targets = {}
    for name, target in TARGETS.items():
        got = results[name]["decode_speedup"]
        targets[name] = {"target": target, "decode_speedup": got, "passed": got >= target}
        print(f"target {name} decode >= {target}x fp32: {got:.2f}x {'PASS' if got >= target else 'FAIL'}")
    for name, target in PREFILL_TARGETS.items():
        got = results[name]["prefill_speedup"]
        targets[f"{name} prefill"] = {"target": target, "prefill_speedup": got, "passed": got >= target}
        print(f"target {name} prefill >= {target}x fp32: {got:.2f}x {'PASS' if got >= target else 'FAIL'}")
    for name in VARIANTS:
        if results[name]["kernels"]:
            print(f"kernels {name}: {results[name]['kernels']}")
    print(f"rest of the step (no Linear work): {floor_ms:.2f} ms/token, so no kernel can exceed "
          f"{results['fp32']['decode_ms_per_token'] / floor_ms:.1f}x fp32 decode here")
    if args.profile:
        prompt = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        for name, model in models.items():
            print(f"--- {name}: one decode of {args.new} tokens\n{profile(model, prompt, args.new)}", file=sys.stderr)
    json_name = "quant_kernels_compiled" if args.compile else "quant_kernels"
    path = write_json(json_name, {"environment": environment(), "settings": settings, "args": vars(args),
                                  "variants": results, "targets": targets}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
