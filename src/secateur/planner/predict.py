"""What one stage will cost: wall time and peak resident memory, from shapes, settings and prices.

A stage is: load the parent, build the calibration set, run the recipe's steps, save and verify
the artifact. Each part is a sum of terms (see :mod:`.costs` for the prices):

**Calibrated methods** (one calibration loop, :mod:`secateur.calibrate`): per block, the
observation pass and the re-run each push every calibration batch through the block (its
projections as matrix products, attention, the elementwise rest as small operations); observers
accumulate ``XᵀX`` (GPTQ, SparseGPT) or column norms; then the method's own work per projection
(GPTQ/SparseGPT: a Cholesky factor per input group and a column sweep with lazy block updates;
Wanda: a sort per row; AWQ: a grid of fake-quantized products); per block a resume checkpoint.
Memory: the weights, the stored activations (inputs and outputs of the block, each
``samples × seq_len × hidden``, none with offload), one batch's working set (attention scores are
``batch × heads × seq²``), the statistics of a block, a dense copy of the block's weights.

**Data-free methods**: per projection, elementwise work or a sort of its weights.

**Training** (distill, qat, gradual): per optimizer step, the teacher's forward and the student's
forward and backward (the backward priced as two forwards), the logits and their losses, AdamW's
update over the parameters; held-out evaluations. Memory: the student, its gradients and AdamW's
two moments, the teacher, and the activations autograd keeps (per block, the attention scores and
the projections' inputs) and the logits.

**Structured pruning**: scoring by activations or block influence is one forward over the
calibration data; the surgery is small.

The counts carry the work's *shape*; the per-method corrections measured by the probes
(:mod:`.probe`) carry what counting misses. Memory adds the resident set every stage starts with
(a process that has imported everything and loaded a small model), measured on this machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .costs import CostModel
from .shapes import ModelShape

CALIBRATED = {"gptq", "sparsegpt", "wanda", "awq", "smoothquant", "mixed"}
TRAINING = {"distill", "qat", "gradual"}
OPS_PER_BLOCK = {"causal": 45, "encoder": 30}        # small torch ops of one block's forward, besides products
MB = 1 << 20


@dataclass
class Data:
    """The calibration set a stage reads: ``samples`` windows of ``seq_len`` tokens."""
    samples: int = 0
    seq_len: int = 0
    text_tokens: Optional[float] = None   # tokens of an encoder's training batch: its texts padded to the longest
    text_seconds: float = 0.0             # what reading and tokenizing the training texts took the planner

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len


@dataclass
class Estimate:
    seconds: float = 0.0
    peak_bytes: float = 0.0
    time: dict[str, float] = field(default_factory=dict)      # seconds by part
    memory: dict[str, float] = field(default_factory=dict)    # bytes by part at the stage's peak

    def add_time(self, part: str, seconds: float) -> None:
        self.time[part] = self.time.get(part, 0.0) + seconds
        self.seconds += seconds


# --- one forward -----------------------------------------------------------------------------------
def block_forward_s(c: CostModel, s: ModelShape, batch: int, seq: int, block: int = 0) -> float:
    rows = batch * seq
    products = sum(c.gemm_s(rows, p.d_in, p.d_out) for p in s.projections if p.block == block)
    attention = c.attention_s(batch, s.heads, seq, s.head_dim)
    rest = c.elementwise_s(rows * (6 * s.hidden + 2 * s.intermediate) * 4) + OPS_PER_BLOCK[s.kind] * c.op_s
    return products + attention + rest


def model_forward_s(c: CostModel, s: ModelShape, batch: int, seq: int, logits: bool = True) -> float:
    t = sum(block_forward_s(c, s, batch, seq, b) for b in range(s.blocks))
    t += c.elementwise_s(batch * seq * s.hidden * 4, 4)  # embeddings, final norm
    if logits and s.kind == "causal":
        t += c.gemm_s(batch * seq, s.hidden, s.vocab)
    return t


def attention_bytes(s: ModelShape, batch: int, seq: int) -> float:
    return 4.0 * batch * s.heads * seq * seq


def batch_bytes(s: ModelShape, batch: int, seq: int) -> float:
    """Live bytes of one block's forward on one batch: the widest activations and the attention scores."""
    return 4.0 * batch * seq * (4 * s.hidden + 3 * s.intermediate) + 2 * attention_bytes(s, batch, seq)


# --- methods ----------------------------------------------------------------------------------------
def _calibrated(c: CostModel, s: ModelShape, step: Any, data: Data, est: Estimate, checkpoint: bool,
                streamed: bool = False) -> float:
    """Seconds of a calibrated step (raw counts); fills the memory parts."""
    method = step.method
    n, seq = max(data.samples, 1), max(data.seq_len, 1)
    bs = max(min(getattr(step, "batch_size", 8) or 8, n), 1)
    batches = math.ceil(n / bs)
    act_bytes = 2 if "bfloat16" in (getattr(step, "activation_dtype", None), getattr(step, "compute_dtype", None)) else 4
    compute_bf16 = getattr(step, "compute_dtype", None) == "bfloat16"
    passes = 2 + (1 if getattr(step, "propagate", "compressed") == "dense" else 0) * 0
    groups: dict[str, Any] = {}
    for p in s.projections:
        groups.setdefault(p.leader, p)
    t = 0.0
    for b in range(s.blocks):
        forward = batches * block_forward_s(c, s, bs, seq, b) * (0.7 if compute_bf16 else 1.0)
        t += passes * forward
        members = [p for p in s.projections if p.block == b]
        leaders = [p for p in groups.values() if p.block == b]
        t += sum(c.gemm_s(bs * seq, p.d_out, p.d_in) for p in members)   # the error of each module on one batch
        if method in ("gptq", "sparsegpt"):
            t += sum(c.gemm_s(p.d_in, bs * seq, p.d_in, batches) for p in leaders)        # XᵀX per batch
            t += sum(c.cholesky_s(p.d_in) for p in leaders)
            for p in members:
                block = min(getattr(step, "block_size", 128) or 128, p.d_in)
                sweeps = math.ceil(p.d_in / block)
                per_column = 14 * c.op_s + c.elementwise_s(p.d_out * block / 2 * 8, 1)
                t += p.d_in * per_column + c.gemm_s(p.d_out, block, p.d_in / 2, sweeps)
                if method == "sparsegpt":
                    t += sweeps * c.sort_s(p.d_out * block)
        elif method == "wanda":
            t += sum(c.elementwise_s(bs * seq * p.d_in * 4, 3 * batches) for p in leaders)
            t += sum(c.sort_s(p.numel) + c.elementwise_s(p.numel * 4, 4) for p in members)
        elif method == "awq":
            grid, clip_grid = getattr(step, "grid", 20), getattr(step, "clip_grid", 20)
            kept = min(getattr(step, "tokens", 1024), n * seq)
            t += sum(c.elementwise_s(bs * seq * p.d_in * 4, 2 * batches) for p in leaders)
            for p in members:
                t += grid * (c.gemm_s(kept, p.d_in, p.d_out) + c.elementwise_s(p.numel * 4, 10))
                if getattr(step, "clip", True):
                    t += clip_grid * getattr(step, "max_shrink", 0.5) * (
                        c.gemm_s(kept, p.d_in, p.d_out) + c.elementwise_s(p.numel * 4, 10))
        else:  # smoothquant, mixed: statistics and a pass over the weights
            t += sum(c.elementwise_s(bs * seq * p.d_in * 4, 2 * batches) for p in leaders)
            t += sum(c.elementwise_s(p.numel * 4, 12) for p in members)
        if checkpoint:
            t += c.write_s(n * seq * s.hidden * act_bytes + sum(p.numel for p in members) * 4)
    # memory at the peak of a block
    stores = 3 if getattr(step, "propagate", "compressed") == "dense" else 2
    acts = stores * (bs if getattr(step, "offload", False) else n) * seq * s.hidden * act_bytes
    block_leaders = [p for p in groups.values() if p.block == 0]
    block_members = [p for p in s.projections if p.block == 0]
    copy = s.max_block_bytes * (1.5 if compute_bf16 else 1)   # dense weights the re-run measures errors against
    if method in ("gptq", "sparsegpt"):
        # groups are compressed in order and each one's XᵀX freed after it; factoring a group holds H
        # and one temporary (GPTQ drops XᵀX first, streamed SparseGPT spills it; else it stays too)
        held = 2 if method == "gptq" or streamed else 3
        hessians = [4 * p.d_in * p.d_in for p in block_leaders]
        stats = max(held * h + sum(hessians[i + 1:]) for i, h in enumerate(hessians)) \
            + 3 * 4 * max(p.numel for p in block_members)
        if method == "sparsegpt":   # reports its own error: one module's copy at a time
            copy = 4 * max(p.numel for p in block_members)
        if streamed:                # read back from the input when the error is measured
            copy = 0
    elif method == "awq":
        stats = sum(4 * min(getattr(step, "tokens", 1024), n * seq) * p.d_in for p in block_leaders)
    else:
        stats = sum(8 * p.d_in for p in block_leaders)
    est.memory.update({"activations": acts, "batch": batch_bytes(s, bs, seq) * c.memory.get("calibrated", 1.0),
                       "statistics": stats, "dense block copy": copy,
                       "calibration ids": 8.0 * n * seq})
    return t


def _training(c: CostModel, s: ModelShape, teacher: ModelShape, step: Any, data: Data, est: Estimate) -> float:
    bs = getattr(step, "batch_size", 16)
    seq = getattr(step, "seq_len", 256)
    if s.kind != "causal" and data.text_tokens:  # sentences padded to the longest of their batch
        seq = min(seq, data.text_tokens)
    steps, accumulate = getattr(step, "steps", 100), getattr(step, "accumulate", 1)
    bf16 = getattr(step, "dtype", "auto") == "bfloat16"
    student = model_forward_s(c, s, bs, seq)
    teacher_fwd = model_forward_s(c, teacher, bs, seq)
    losses = c.elementwise_s(bs * seq * s.vocab * 4, 12) if s.kind == "causal" else c.elementwise_s(bs * s.hidden * 4, 12)
    n_tensors = 2 * len(s.projections) + 2 * s.blocks + 4
    optimizer = c.elementwise_s(s.params * 4 * 4, 1) * 6 + n_tensors * 12 * c.op_s
    per_step = accumulate * (teacher_fwd + 3 * student + 2 * losses) + optimizer
    eval_every = getattr(step, "eval_every", 100) or steps
    holdout = max(1, int(getattr(step, "holdout", 0.05) * max(data.samples, 1) / bs) + 1)
    evals = (steps // eval_every + 1) * holdout * (student + teacher_fwd + losses)
    t = steps * per_step * (0.8 if bf16 else 1.0) + evals + data.text_seconds
    # memory: the student's state, the teacher, and what autograd keeps for one micro-batch
    kept_per_block = bs * seq * (6 * s.hidden + 3 * s.intermediate) * 4 + 2 * attention_bytes(s, bs, seq)
    logits = 6.0 * bs * seq * s.vocab * 4 if s.kind == "causal" else 4.0 * bs * seq * s.hidden
    est.memory.update({"optimizer state": 3.0 * s.params * 4, "teacher": teacher.memory_bytes,
                       "autograd activations": (s.blocks * kept_per_block + logits) * c.memory.get("training", 1.0)})
    return t


def _data_free(c: CostModel, s: ModelShape, step: Any, est: Estimate) -> float:
    method = step.method
    t = 0.0
    for p in s.projections:
        if method == "magnitude":
            t += c.sort_s(p.numel) + c.elementwise_s(p.numel * 4, 4)
        else:  # rtn, fp8: a scale per row or group, round, clamp, cast
            t += c.elementwise_s(p.numel * 4, 12)
    largest = max((p.numel for p in s.projections), default=0)
    est.memory["working copies"] = 4.0 * 4 * largest
    return t


def _structured(c: CostModel, s: ModelShape, step: Any, data: Data, est: Estimate) -> float:
    needs_data = data.samples > 0 and getattr(step, "importance", "auto") != "magnitude"
    t = c.elementwise_s(s.params * 4, 6) + len(s.projections) * 20 * c.op_s
    if needs_data:
        bs = max(min(getattr(step, "batch_size", 8), data.samples), 1)
        t += math.ceil(data.samples / bs) * model_forward_s(c, s, bs, data.seq_len, logits=False) * \
            (1 + (1 if getattr(step, "drop_layers", 0) or getattr(step, "blocks", ()) else 0))
        est.memory["batch"] = batch_bytes(s, bs, data.seq_len) * c.memory.get("calibrated", 1.0)
    est.memory["copy of the model"] = float(s.memory_bytes)
    return t


def method_seconds(c: CostModel, shape: ModelShape, teacher: ModelShape, step: Any, data: Data, est: Estimate,
                   checkpoint: bool = True, streamed: bool = False) -> float:
    """Raw (uncorrected) seconds of one step on a model of ``shape``; fills ``est.memory``."""
    method = step.method
    if method in CALIBRATED:
        return _calibrated(c, shape, step, data, est, checkpoint, streamed)
    if method in TRAINING:
        return _training(c, shape, teacher, step, data, est)
    if method == "structured":
        return _structured(c, shape, step, data, est)
    return _data_free(c, shape, step, est)


def stage(c: CostModel, parent: ModelShape, steps: list[Any], data: Optional[Data], checkpoint: bool = True,
          streamed: bool = False) -> tuple[Estimate, ModelShape]:
    """The estimate of a stage that loads a model of shape ``parent``, runs ``steps`` on it and saves
    the result; and the result's shape. ``streamed``: the model is never loaded whole (``secateur
    compress --stream``): memory holds the block being compressed, the block being written, the
    embedding rows the calibration tokens use, never the weights of the model."""
    data = data or Data()
    est = Estimate()
    est.add_time("load", c.load_fixed_s + c.read_s(parent.disk_bytes))
    if data.samples:
        est.add_time("calibration data", 0.02 + data.tokens / 2e6)
    shape, peak_work = parent, 0.0
    for step in steps:
        part = Estimate()
        counted = method_seconds(c, shape, parent, step, data, part, checkpoint, streamed)
        seconds = c.method_s(step.method, counted, len(shape.projections))
        est.add_time(step.method, seconds)
        work = sum(part.memory.values())
        if work > peak_work:
            peak_work, est.memory = work, dict(part.memory)
        shape = shape.after(step)
    est.add_time("save", c.write_s(shape.disk_bytes) + 2 * shape.disk_bytes / c.hash_bps + c.save_fixed_s)
    base = c.base_rss.get(parent.kind, c.base_rss.get("causal", 400 * MB))
    if streamed:
        width = parent.memory_bytes / max(parent.params, 1)      # bytes per weight as stored
        est.add_time("hash source", parent.disk_bytes / c.hash_bps)
        # the block's written copy (packed integers, bitmask values) exists only once its statistics
        # are freed, so it is not added to them
        est.memory = {"process": base, "block weights": width / 4 * parent.max_block_bytes,
                      "embedding rows": width * parent.hidden * min(data.tokens or 1, parent.vocab), **est.memory}
    else:
        est.memory = {"process": base, "weights": c.load_rss_per_byte * parent.memory_bytes, **est.memory}
    est.peak_bytes = sum(est.memory.values())
    return est, shape


__all__ = ["Data", "Estimate", "stage", "method_seconds", "block_forward_s", "model_forward_s",
           "CALIBRATED", "TRAINING"]
