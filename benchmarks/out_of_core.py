"""Out-of-core compression: a model larger than this machine's memory, compressed block by block.

1. ``--generate`` writes a synthetic Llama-architecture model with the shapes of Llama-3-8B
   (hidden 4096, intermediate 14336, 32 blocks, 32 heads / 8 KV heads, vocabulary 128256, untied
   head) in float32 with random weights: 8.03 B parameters, 32.1 GB on disk, one shard per block,
   written one block at a time.
2. GPTQ W4 (groups of 128) and SparseGPT 50% run on it streamed (``secateur compress RECIPE --out
   DIR --stream``'s code path), each in its own process, on a small random-token calibration set.
   Each run's peak RSS (the child's own ``VmHWM``, as ``secateur.progress.peak_rss_bytes`` reads
   it: the kernel's exact high-water mark, so no sampler is needed), wall time, phase times and
   output size are recorded, beside the memory bar: two blocks' weights + the calibration activations + 2 GiB.
   The SparseGPT output is written with bitmask storage (53% of its dense bytes), which is what
   lets input and output fit on this machine's disk together.
3. On a model small enough for both (``--check-layers`` blocks of the same width), the streamed
   output is checked block by block against the in-memory run: every tensor bit for bit.
4. ``secateur plan``'s streamed peak prediction is printed beside each measured peak.

    python benchmarks/out_of_core.py --generate --dir /work/big          # once (about 32 GB)
    python benchmarks/out_of_core.py --dir /work/big [--methods gptq sparsegpt] [--samples 16]
    python benchmarks/out_of_core.py --dir /work/big --one-block   # every phase at full size, 1 block
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_line, environment, print_table, write_json

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
          "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def block_bytes(config: dict) -> int:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    return (2 * h * h + 2 * kv * h + 3 * h * i + 2 * h) * 4


def generate(root: Path, config: dict, seed: int = 0) -> Path:
    """Write the synthetic model at ``root`` one shard at a time (resumes: finished shards are kept)."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    parts = [("embed", None)] + [("block", i) for i in range(config["num_hidden_layers"])] + [("head", None)]
    for kind, i in parts:
        name = f"{kind}.safetensors" if i is None else f"block-{i:03d}.safetensors"
        if kind == "embed":
            tensors = {"model.embed_tokens.weight": randn(config["vocab_size"], h),
                       "model.norm.weight": torch.ones(h)}
        elif kind == "head":
            tensors = {"lm_head.weight": randn(config["vocab_size"], h)}
        else:
            p = f"model.layers.{i}"
            tensors = {f"{p}.self_attn.q_proj.weight": randn(h, h), f"{p}.self_attn.k_proj.weight": randn(kv, h),
                       f"{p}.self_attn.v_proj.weight": randn(kv, h), f"{p}.self_attn.o_proj.weight": randn(h, h),
                       f"{p}.mlp.gate_proj.weight": randn(inter, h), f"{p}.mlp.up_proj.weight": randn(inter, h),
                       f"{p}.mlp.down_proj.weight": randn(h, inter),
                       f"{p}.input_layernorm.weight": torch.ones(h), f"{p}.post_attention_layernorm.weight": torch.ones(h)}
        weight_map.update({k: name for k in tensors})
        if not (root / name).exists():
            t0 = time.perf_counter()
            save_file(tensors, str(root / f".{name}.tmp"), metadata={"format": "pt"})
            os.replace(root / f".{name}.tmp", root / name)
            print(f"wrote {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        del tensors
    total = sum((root / f).stat().st_size for f in set(weight_map.values()))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    return root


RECIPES = {"gptq": {"method": "gptq", "bits": 4, "group_size": 128},
           "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5}}
STORAGE = {"gptq": "dense", "sparsegpt": "sparse"}


def child(method: str, source: Path, out: Path, samples: int, seq_len: int, batch: int, json_out: Path) -> None:
    """One streamed run in this process: peak RSS sampled every 0.2 s and as ``VmHWM`` (not
    ``ru_maxrss``, which Linux carries over from the parent across ``execve``)."""
    import torch

    from secateur.data.calibration import CalibrationSet
    from secateur.pipeline.recipe_run import run_streamed
    from secateur.recipe import Recipe

    from secateur.progress import peak_rss_bytes

    idle = peak_rss_bytes()
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    data = CalibrationSet(ids, f"random-{samples}x{seq_len}-seed0", {"source": "random tokens"})
    recipe = Recipe.from_dict({"model": str(source), "steps": [{**RECIPES[method], "batch_size": batch}]})
    t0 = time.perf_counter()
    result = run_streamed(recipe, out, STORAGE[method], data=data)
    wall = time.perf_counter() - t0
    step = result.steps[0]["result"]
    json_out.write_text(json.dumps({"wall_s": wall, "peak_rss": peak_rss_bytes(), "idle_rss": idle, "phase_seconds": step.get("calibration", {}).get(
        "phase_seconds"), "loop_seconds": step.get("loop_seconds"), "artifact": result.artifact}))


def check_small(root: Path, layers: int, method: str) -> dict:
    """The same method in memory and streamed on a ``layers``-block model of the same width:
    every output tensor compared bit for bit, block by block."""
    import torch
    from safetensors import safe_open

    from secateur.api import compress_
    from secateur.artifacts import load
    from secateur.data.calibration import CalibrationSet
    from secateur.pipeline.recipe_run import run_streamed
    from secateur.recipe import Recipe

    config = {**CONFIG, "num_hidden_layers": layers, "vocab_size": 4096}
    small = generate(root / f"check-{layers}", config, seed=1)
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    data = CalibrationSet(ids, "random-4x64", {})
    recipe = Recipe.from_dict({"model": str(small), "steps": [{**RECIPES[method], "batch_size": 2}]})
    out = root / f"check-{layers}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    run_streamed(recipe, out, "dense", data=data)
    loaded = load(str(small))
    compress_(loaded.model, recipe, data=data)
    from secateur.artifacts import compressed_tensors

    reference = (compressed_tensors.state_dict(loaded.model)[0] if compressed_tensors.has_quantized(loaded.model)
                 else loaded.model.state_dict())
    equal = differ = 0
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                same = torch.equal(f.get_tensor(key), reference[key])
                equal, differ = equal + same, differ + (not same)
    shutil.rmtree(out, ignore_errors=True)
    return {"layers": layers, "method": method, "tensors_equal": equal, "tensors_differ": differ,
            "reference_tensors": len(reference)}


def read_child(how: str, file: str) -> None:
    """Read the embedding of ``file`` in 64 MiB row chunks, through safetensors' memory map
    (``mmap``) or secateur's plain reads (``plain``); print the peak RSS in bytes."""
    import torch

    name = "model.embed_tokens.weight"
    total = 0
    if how == "mmap":
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            piece = f.get_slice(name)
            rows = piece.get_shape()[0]
            step = (64 << 20) // (piece.get_shape()[1] * 4)
            for start in range(0, rows, step):
                total += piece[start:start + step].clone().numel()
    else:
        from secateur.artifacts.stream import _row_chunks

        for chunk in _row_chunks(Path(file), name)[2]:
            total += chunk.numel()
    from secateur.progress import peak_rss_bytes

    print(peak_rss_bytes(), total, torch.get_num_threads())


def one_block(args: argparse.Namespace) -> None:
    """The full run's widths and vocabulary with one block: every phase of a streamed run (hash,
    skeleton, the block, the embedding and head copied to the output, the card) at the size the
    32-block run has them, in minutes instead of an hour."""
    source = generate(args.dir / "llama8b-1block-fp32", {**CONFIG, "num_hidden_layers": 1})
    config = json.loads((source / "config.json").read_text())
    block = block_bytes(config)
    tokens, h, inter = args.samples * args.seq_len, config["hidden_size"], config["intermediate_size"]
    activations = 2 * tokens * h * 4 + 3 * args.batch * args.seq_len * inter * 4
    bar = 2 * block + activations + 2 * 2**30
    rows, runs = [], {}
    for method in args.methods:
        record = args.dir / f"{method}-1block.json"
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--source", source.name, "--samples",
                        str(args.samples), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--child",
                        method, str(record)], check=True)
        run = json.loads(record.read_text())
        runs[method] = run
        shutil.rmtree(args.dir / f"out-{method}", ignore_errors=True)
        rows.append([method, f"{run['peak_rss'] / 2**30:.2f} GiB", f"{bar / 2**30:.2f} GiB",
                     "yes" if run["peak_rss"] <= bar else "NO", f"{run['wall_s']:.0f} s"])
    reads = {}
    for how in ("mmap", "plain"):
        out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--read-child", how,
                              str(source / "embed.safetensors")], check=True, capture_output=True, text=True)
        reads[how] = int(out.stdout.split()[0])
    print_table(f"One block at Llama-3-8B widths, vocabulary 128256, streamed ({cpu_line()}; "
                f"{args.samples}x{args.seq_len} calibration tokens)",
                ["method", "peak RSS", "bar", "within", "wall"], rows)
    print_table("Copying the 2.1 GB embedding in 64 MiB chunks: peak RSS",
                ["read through", "peak RSS"],
                [["safetensors' memory map (before)", f"{reads['mmap'] / 2**30:.2f} GiB"],
                 ["plain file reads (secateur now)", f"{reads['plain'] / 2**30:.2f} GiB"]])
    write_json("out_of_core_one_block", {"environment": environment(), "block_bytes": block, "bar_bytes": bar,
                                         "activation_bytes": activations, "runs": runs, "embedding_read_peak": reads,
                                         "samples": args.samples, "seq_len": args.seq_len, "batch": args.batch},
               args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate", action="store_true", help="write the synthetic 8B-shaped model and stop")
    parser.add_argument("--dir", type=Path, required=True, help="where the synthetic model and outputs go")
    parser.add_argument("--methods", nargs="+", default=["gptq", "sparsegpt"], choices=sorted(RECIPES))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="calibration batch size")
    parser.add_argument("--check-layers", type=int, default=2, help="blocks of the small model checked bit for bit")
    parser.add_argument("--keep", action="store_true", help="keep the compressed outputs")
    parser.add_argument("--one-block", action="store_true",
                        help="instead of the 32-block run: the same widths and vocabulary with 1 block (the "
                             "embedding and head copied as in the full run), each method's streamed peak, and the "
                             "peak of copying the 2.1 GB embedding through a memory map vs secateur's plain reads")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--read-child", nargs=2, metavar=("HOW", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--source", default="llama8b-fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    source = args.dir / args.source
    if args.generate:
        generate(source, CONFIG)
        return
    if args.child:
        child(args.child[0], source, args.dir / f"out-{args.child[0]}", args.samples, args.seq_len, args.batch,
              Path(args.child[1]))
        return
    if args.read_child:
        read_child(*args.read_child)
        return
    if args.one_block:
        one_block(args)
        return
    if not (source / "model.safetensors.index.json").exists():
        sys.exit(f"error: no synthetic model at {source}; run with --generate first")
    import torch

    from secateur.planner import Data, plan_recipe
    from secateur.recipe import Recipe

    config = json.loads((source / "config.json").read_text())
    model_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    block = block_bytes(config)
    h, inter = config["hidden_size"], config["intermediate_size"]
    tokens = args.samples * args.seq_len
    # what the loop holds: a block's inputs and outputs for every sample, plus one batch's widest
    # intermediate (the MLP's gate, up and their product)
    activations = 2 * tokens * h * 4 + 3 * args.batch * args.seq_len * inter * 4
    bar = 2 * block + activations + 2 * 2**30
    rows, runs, checks = [], {}, []
    for method in args.methods:
        out = args.dir / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        record = args.dir / f"{method}.json"
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--samples", str(args.samples), "--seq-len",
               str(args.seq_len), "--batch", str(args.batch), "--child", method, str(record)]
        subprocess.run(cmd, check=True)
        run = json.loads(record.read_text())
        run["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        step = Recipe.from_dict({"steps": [{**RECIPES[method], "batch_size": args.batch}]}).steps[0]
        predicted = plan_recipe(str(source), [step], Data(args.samples, args.seq_len), streamed=True)
        run["predicted_peak"] = predicted.peak_bytes
        run["prediction"] = {"seconds": predicted.seconds, "memory": predicted.memory}
        runs[method] = run
        rows.append([method, f"{model_bytes / 1e9:.1f} GB", f"{run['output_bytes'] / 1e9:.2f} GB",
                     f"{run['peak_rss'] / 2**30:.2f} GiB", f"{predicted.peak_bytes / 2**30:.2f} GiB",
                     f"{bar / 2**30:.2f} GiB", "yes" if run["peak_rss"] <= bar else "NO",
                     f"{run['wall_s'] / 60:.1f} min"])
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        checks.append(check_small(args.dir, args.check_layers, method))
        # written after each method, so an hour's run is kept if a later one is stopped
        write_json("out_of_core", {"environment": environment(), "model_bytes": model_bytes, "block_bytes": block,
                                   "activation_bytes": activations, "bar_bytes": bar, "config": config,
                                   "samples": args.samples, "seq_len": args.seq_len, "batch": args.batch,
                                   "runs": runs, "checks": checks, "torch_threads": torch.get_num_threads()},
                   args.out)
    print_table(f"Out-of-core compression of a {model_bytes / 1e9:.1f} GB Llama-3-8B-shaped fp32 model "
                f"({cpu_line()}, 24 GiB RAM; {args.samples}x{args.seq_len} calibration tokens)",
                ["method", "model", "output", "peak RSS", "planner", "bar", "within", "wall"], rows)
    print(f"bar = 2 blocks ({2 * block / 2**30:.2f} GiB) + activations ({activations / 2**30:.2f} GiB) + 2 GiB")
    print_table("Streamed vs in-memory on a small model of the same width (every output tensor)",
                ["method", "blocks", "tensors equal", "differ"],
                [[c["method"], c["layers"], c["tensors_equal"], c["tensors_differ"]] for c in checks])


if __name__ == "__main__":
    main()
