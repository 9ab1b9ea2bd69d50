"""The machine's cost model: what a unit of each kind of work costs here, measured once and cached.

The planner prices a stage as a sum of *terms*, each an amount of one kind of work read from the
model's shapes and the step's settings (flops of a matrix product of a given size, small-tensor
operations, bytes moved elementwise, a Cholesky factor of order d, elements sorted, bytes read
or written and fsynced). This module measures the unit price of each kind on this machine, with
the threads a run will use:

* ``gemm``: float32 matrix products at a grid of sizes (rows × a square-ish weight), as GFLOP/s;
  a product of another size is priced by interpolating the grid in log space (small products run
  far below peak, which is what makes small models cost what they cost);
* ``attention``: ``scaled_dot_product_attention`` (causal and not) as GFLOP/s;
* ``op``: the fixed cost of one small torch operation (dispatch, allocation);
* ``elementwise``: bytes per second of a large in-place elementwise operation;
* ``cholesky``: seconds per d³ of the factor-and-invert GPTQ and SparseGPT do;
* ``sort``: elements per second of a row-wise sort / top-k;
* ``read`` / ``write``: bytes per second of reading a file and of writing one with fsync;
* ``rss``: the resident memory of a process that has loaded a small model (what every stage pays
  before its own work), and how much the resident set grows per byte of weights loaded;
* ``methods``: per-method corrections, the measured time of the real method on small synthetic
  models divided by what the terms alone predict (the terms count the work; the correction
  carries what a count misses: Python loops, copies). See :mod:`secateur.planner.probe`.

The result is cached as JSON under ``SECATEUR_HOME/planner/`` keyed by the machine (CPU, flags,
threads, torch) and secateur's version; ``secateur plan --remeasure`` measures again.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .._version import __version__

GEMM_ROWS = (64, 512, 4096)
GEMM_WIDTHS = (32, 128, 512, 1536)


@dataclass
class CostModel:
    machine: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    gemm: list[list[float]] = field(default_factory=list)      # [rows, width, gflops]
    attention_score_s: float = 1e-9       # seconds per attention score (batch·heads·seq²) ...
    attention_score_dim_s: float = 1e-11  # ... plus this per score and head dimension
    attention_head_s: float = 2e-6        # ... plus this per (batch, head) matrix
    op_s: float = 5e-6
    elementwise_bps: float = 5e9
    cholesky_s_per_d3: float = 1e-9
    cholesky_fixed_s: float = 1e-4
    sort_eps: float = 1e8
    read_bps: float = 1e9
    write_bps: float = 5e8
    write_fixed_s: float = 0.01
    hash_bps: float = 1e9
    base_rss: dict[str, float] = field(default_factory=dict)  # kind -> bytes resident before a stage's work
    load_rss_per_byte: float = 1.0
    load_fixed_s: float = 0.05
    methods: dict[str, float] = field(default_factory=dict)   # method -> measured / counted time
    per_projection_s: dict[str, float] = field(default_factory=dict)  # method -> fixed seconds per projection
    save_fixed_s: float = 0.05
    memory: dict[str, float] = field(default_factory=dict)    # transient multipliers fitted by the probes
    measured_at: str = ""
    seconds: float = 0.0
    version: str = __version__

    # --- prices --------------------------------------------------------------------------------------
    def gemm_s(self, rows: float, d_in: float, d_out: float, count: float = 1.0) -> float:
        """Seconds for ``count`` float32 products [rows, d_in] @ [d_in, d_out]."""
        if rows <= 0 or d_in <= 0 or d_out <= 0 or count <= 0:
            return 0.0
        flops = 2.0 * rows * d_in * d_out
        return count * (flops / (self.gflops(rows, math.sqrt(d_in * d_out)) * 1e9) + self.op_s)

    def gflops(self, rows: float, width: float) -> float:
        """GFLOP/s of a product with ``rows`` rows and a weight of about ``width`` × ``width``
        (bilinear interpolation of the measured grid in log-log space, flat outside it)."""
        grid = {(int(r), int(w)): g for r, w, g in self.gemm}
        rs = sorted({r for r, _ in grid})
        ws = sorted({w for _, w in grid})
        if not rs or not ws:
            return 10.0

        def bracket(values: list[int], x: float) -> tuple[int, int, float]:
            x = min(max(x, values[0]), values[-1])
            for a, b in zip(values, values[1:]):
                if a <= x <= b:
                    return a, b, (math.log(x) - math.log(a)) / (math.log(b) - math.log(a)) if b > a else 0.0
            return values[-1], values[-1], 0.0

        r0, r1, tr = bracket(rs, rows)
        w0, w1, tw = bracket(ws, width)
        lg = lambda r, w: math.log(grid[(r, w)])  # noqa: E731
        top = lg(r0, w0) * (1 - tw) + lg(r0, w1) * tw
        bottom = lg(r1, w0) * (1 - tw) + lg(r1, w1) * tw
        return math.exp(top * (1 - tr) + bottom * tr)

    def attention_s(self, batch: float, heads: float, seq: float, head_dim: float, count: float = 1.0) -> float:
        """One ``scaled_dot_product_attention`` forward. On a CPU it costs per score (a causal mask
        saves nothing: every score is computed, then masked) and per head dimension, with a fixed
        cost per (batch, head) matrix that dominates short sequences."""
        scores = batch * heads * seq * seq
        per_score = self.attention_score_s + head_dim * self.attention_score_dim_s
        return count * (scores * per_score + batch * heads * self.attention_head_s + 3 * self.op_s)

    def elementwise_s(self, nbytes: float, ops: float = 1.0) -> float:
        return ops * (nbytes / self.elementwise_bps + self.op_s)

    def cholesky_s(self, d: float, count: float = 1.0) -> float:
        return count * (self.cholesky_s_per_d3 * d ** 3 + self.cholesky_fixed_s)

    def sort_s(self, elements: float) -> float:
        return elements * max(math.log2(max(elements, 2.0)), 1.0) / 20.0 / self.sort_eps + self.op_s

    def read_s(self, nbytes: float) -> float:
        return nbytes / self.read_bps

    def write_s(self, nbytes: float) -> float:
        return nbytes / self.write_bps + self.write_fixed_s

    def method_s(self, method: str, counted: float, projections: int) -> float:
        """A method's predicted seconds from its counted seconds (the probes' correction)."""
        return self.methods.get(method, 1.0) * counted + self.per_projection_s.get(method, 0.0) * projections

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CostModel":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- measuring ------------------------------------------------------------------------------------
def _best(fn: Callable[[], Any], repeat: int = 5, min_time: float = 0.02) -> float:
    """Seconds of one call of ``fn``: the best of ``repeat`` rounds, each long enough to time."""
    fn()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or calls >= 1 << 16:
            break
        calls *= 4
    best = elapsed / calls
    for _ in range(repeat - 1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure_primitives(model: CostModel) -> CostModel:
    """The unit prices that need no model: products, attention, small ops, bandwidth, factorizations, sorting, files."""
    import tempfile

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model.threads = torch.get_num_threads()
    grid = []
    for rows in GEMM_ROWS:
        for width in GEMM_WIDTHS:
            a, w = torch.randn(rows, width), torch.randn(width, width)
            out = torch.empty(rows, width)
            seconds = _best(lambda: torch.matmul(a, w, out=out), repeat=3)
            grid.append([rows, width, 2.0 * rows * width * width / seconds / 1e9])
    model.gemm = grid
    # attention: per score at two head dimensions, then the per-matrix cost of many short sequences
    timed = {}
    for d in (8, 64):
        q = torch.randn(8, 8, 256, d)
        timed[d] = _best(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), repeat=3) / (8 * 8 * 256 * 256)
    model.attention_score_dim_s = max((timed[64] - timed[8]) / 56, 0.0)
    model.attention_score_s = max(timed[8] - 8 * model.attention_score_dim_s, 1e-12)
    q = torch.randn(64, 12, 16, 32)
    seconds = _best(lambda: F.scaled_dot_product_attention(q, q, q), repeat=3)
    per_score = model.attention_score_s + 32 * model.attention_score_dim_s
    model.attention_head_s = max((seconds - 64 * 12 * 16 * 16 * per_score) / (64 * 12), 0.0)
    small, scale = torch.randn(64, 32), torch.rand(64, 1) + 0.5

    def few_ops() -> None:  # the kind of small operation a method's inner loop is made of
        torch.div(small, scale).round_().clamp_(-8, 7).mul_(scale).sub_(small).abs_().amax()

    model.op_s = _best(few_ops, repeat=5) / 7
    big = torch.randn(16 << 20)
    out = torch.empty_like(big)
    model.elementwise_bps = 2 * big.numel() * 4 / _best(lambda: torch.mul(big, 1.0001, out=out), repeat=3)
    chol = []
    for d in (64, 512):
        x = torch.randn(d, 2 * d)
        h = x @ x.T + d * torch.eye(d)
        chol.append((d, _best(lambda: torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                                               upper=True), repeat=3)))
    (d0, t0), (d1, t1) = chol
    model.cholesky_s_per_d3 = max((t1 - t0) / (d1 ** 3 - d0 ** 3), 1e-13)
    model.cholesky_fixed_s = max(t0 - model.cholesky_s_per_d3 * d0 ** 3, 0.0)
    rows = torch.randn(256, 4096)
    n = rows.numel()
    model.sort_eps = n * math.log2(n) / 20.0 / _best(lambda: torch.sort(rows.abs(), dim=1), repeat=3)
    payload = os.urandom(32 << 20)
    import hashlib

    model.hash_bps = len(payload) / _best(lambda: hashlib.sha256(payload).digest(), repeat=3)
    with tempfile.TemporaryDirectory(prefix="secateur-plan-") as tmp:
        path = Path(tmp) / "probe.bin"
        writes = []
        for size in (1 << 16, len(payload)):
            start = time.perf_counter()
            with open(path, "wb") as fh:
                fh.write(payload[:size])
                fh.flush()
                os.fsync(fh.fileno())
            writes.append((size, time.perf_counter() - start))
        (s0, w0), (s1, w1) = writes
        model.write_bps = (s1 - s0) / max(w1 - w0, 1e-6)
        model.write_fixed_s = max(w0 - s0 / model.write_bps, 0.0)
        start = time.perf_counter()
        with open(path, "rb") as fh:
            while fh.read(8 << 20):
                pass
        model.read_bps = len(payload) / max(time.perf_counter() - start, 1e-6)
    return model


def cache_path() -> Path:
    from .. import settings
    from ..runtime import machine

    return settings.home() / "planner" / f"costs-{machine.key()}-{__version__}.json"


def cost_model(remeasure: bool = False, *, probe_methods: bool = True) -> CostModel:
    """This machine's cost model: the file named by ``SECATEUR_COST_MODEL`` when set (one measured
    elsewhere, or fixed prices for tests), else read from the cache, or measured (about a minute)
    and cached."""
    given = os.environ.get("SECATEUR_COST_MODEL")
    if given and not remeasure:
        from ..errors import SecateurError

        try:
            return CostModel.from_dict(json.loads(Path(given).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise SecateurError(f"SECATEUR_COST_MODEL={given}: not a readable cost model ({exc}); unset it to "
                                "measure this machine's") from None
    path = cache_path()
    if not remeasure and path.is_file():
        try:
            return CostModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            pass  # a damaged cache is measured again
    model = measure(probe_methods=probe_methods)
    save(model, path)
    return model


def measure(probe_methods: bool = True) -> CostModel:
    from ..progress import track
    from ..runtime import machine
    from . import probe

    start = time.perf_counter()
    model = CostModel(machine=machine.describe(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    phases: list[tuple[str, Callable[[CostModel], Any]]] = [("primitives", measure_primitives),
                                                            ("memory", probe.measure_memory)]
    if probe_methods:
        phases.append(("methods", probe.measure_methods))
    for _, phase in track(phases, "measuring this machine's cost model", total=len(phases)):
        phase(model)
    model.seconds = round(time.perf_counter() - start, 2)
    return model


def save(model: CostModel, path: Optional[Path] = None) -> Path:
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(model.to_dict(), indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["CostModel", "cost_model", "measure", "measure_primitives", "cache_path", "save"]
