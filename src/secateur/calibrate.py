"""THE block-sequential calibration loop, shared by every method that needs data.

    result = sequential(model, data, targets, method, options)

1. **Capture.** The first block's inputs are captured by running only what precedes it: a
   forward pre-hook on block 0 records the hidden states and every keyword argument the model
   passes to a block (attention mask, rotary position embeddings, position ids…) and stops the
   forward there. No per-family code: whatever the model hands its blocks is what we replay.
2. **Per block.** Hooks feed the targeted modules' inputs to observers (one per *input group*:
   projections that read the same tensor — q/k/v, gate/up — share one statistic, computed once,
   using the architecture table's ``shared_inputs``). The method rewrites each module from its
   statistic. The compressed block is re-run to produce the next block's inputs (or the dense
   outputs of the observation pass are propagated, ``propagate="dense"``), and the same re-run
   measures each module's relative reconstruction error ||WX − ŴX||² / ||WX||² against a copy
   of its dense weight.
3. **Bounded memory.** Only the block being worked on is moved to ``options.device``;
   activations are kept in ``options.activation_dtype`` and can be offloaded to disk.
4. **Resume.** With a checkpoint directory, after each block the block's new weights, the next
   block's inputs and the records so far are written atomically; a re-run of the same job loads
   them and continues from the next block, giving bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn

from .errors import SecateurError
from .progress import track

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- several processes --------------------------------------------------------------------------
def world() -> tuple[int, int]:
    """``(rank, size)`` of the process group the calibration runs in; ``(0, 1)`` alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the process group (``sum`` or ``max``); alone, a no-op."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def reduce_count(n: int) -> int:
    """An integer summed over the process group."""
    return int(all_reduce_(torch.tensor([n], dtype=torch.int64))[0])


def gather_batches(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's per-batch tensors (rank ``r`` holds global batches ``r, r + W, …``, as
    :func:`sequential` deals them) gathered on every rank in global batch order. Shapes travel
    first, then the values as one flat float32 tensor per rank: no pickling."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return parts
    cols = int(parts[0].shape[-1]) if parts else 0
    counts = torch.zeros(size, dtype=torch.int64)
    counts[rank] = len(parts)
    all_reduce_(counts)
    rows = torch.zeros(size, int(counts.max()), dtype=torch.int64)
    rows[rank, :len(parts)] = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
    cols = int(all_reduce_(torch.tensor([cols]), "max")[0])
    all_reduce_(rows)
    flat = [torch.zeros(int(rows[r].sum()) * cols) for r in range(size)]
    mine = torch.cat([p.reshape(-1).float() for p in parts]) if parts else torch.zeros(0)
    for r in range(size):  # a broadcast per rank: sizes differ, which all_gather does not allow
        if r == rank:
            flat[r].copy_(mine)
        dist.broadcast(flat[r], src=r)
    per_rank = [list(flat[r].split([int(n) * cols for n in rows[r, :int(counts[r])]])) for r in range(size)]
    out = []
    for g in range(int(counts.sum())):
        out.append(per_rank[g % size][g // size].view(-1, cols))
    return out


def _broadcast_module(module: nn.Module, src: int) -> None:
    """Make ``module``'s parameters and buffers on every rank those of rank ``src``; buffers a method
    attached there (scales, zero points) are created where they are missing. The names, shapes and
    dtypes travel as JSON bytes, the values as tensors."""
    import torch.distributed as dist

    state = dict(module.state_dict())
    spec = _broadcast_json({k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}, src)
    for key, (shape, dtype) in spec.items():
        value = state.get(key)
        if value is None or list(value.shape) != shape or str(value.dtype).removeprefix("torch.") != dtype:
            value = torch.zeros(shape, dtype=getattr(torch, dtype))
            owner = module.get_submodule(key.rpartition(".")[0]) if "." in key else module
            owner.register_buffer(key.rpartition(".")[2], value)
        dist.broadcast(value, src=src)


def _broadcast_json(obj: Any, src: int) -> Any:
    """``obj`` as rank ``src`` has it, on every rank: JSON bytes in a uint8 tensor (no pickling)."""
    import torch.distributed as dist

    rank, _ = world()
    data = torch.tensor(list(json.dumps(obj, default=str).encode()), dtype=torch.uint8) if rank == src else \
        torch.zeros(0, dtype=torch.uint8)
    length = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(length, src=src)
    if rank != src:
        data = torch.zeros(int(length[0]), dtype=torch.uint8)
    dist.broadcast(data, src=src)
    return json.loads(bytes(data.tolist()).decode())


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): gloo on
    CPU, NCCL when every rank has a GPU. Alone: nothing. Returns :func:`world`."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= int(
            os.environ.get("LOCAL_WORLD_SIZE", "1")) else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


# --- observers: statistics of a module's inputs ----------------------------------------------
class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


class ColumnNorms:
    """Σ over tokens of x_j² for each input column j (Wanda's ||X_j||₂², squared)."""

    def __init__(self, columns: int):
        self.sq = torch.zeros(columns, dtype=torch.float64)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += (x * x).sum(0).double()  # a batch's partial sum in float32, the running total in float64
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        """Sum over the process group (float64: the order of the ranks' partial sums changes only
        the last bits of a float64)."""
        all_reduce_(self.sq)
        self.tokens = reduce_count(self.tokens)


@lru_cache(maxsize=None)
def _bf16_matmul() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively on this CPU (and torch lets us ask for it)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and hasattr(torch.backends.mkldnn, "matmul")
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - an older or stripped torch
        return False


@contextmanager
def _fp32_matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


class Hessian:
    """H = 2/n Σ xᵀx over the n calibration tokens (SparseGPT, GPTQ), accumulated in float32."""

    def __init__(self, columns: int):
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu" and _bf16_matmul()
        x = x.reshape(-1, x.shape[-1]).float()
        # bf16 values multiply exactly in float32 and oneDNN accumulates in float32, so letting it
        # run this float32 product on bf16 units (AMX / AVX-512 BF16) changes no result but the
        # summation order, and is ~2.5x faster than the float32 GEMM
        with _fp32_matmul_precision("bf16") if exact_bf16 else nullcontext():
            self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        """Sum XᵀX over the process group. Each rank sums its own batches, then the ranks' sums are
        added: the same terms as one process in another order, so H differs from a single run by
        float32 summation order only (relative ~1e-6; tested)."""
        all_reduce_(self.xtx)
        self.tokens = reduce_count(self.tokens)

    spill_dir: Path | None = None     # set by a streamed run: where XᵀX may wait on disk (see spill)
    _spilled: Path | None = None

    @property
    def H(self) -> torch.Tensor:
        return self.matrix() * (2.0 / max(self.tokens, 1))

    def matrix(self) -> torch.Tensor:
        """XᵀX (read back whole if it was spilled)."""
        if self.xtx is not None:
            return self.xtx
        if self._spilled is not None:
            return self.rows(0, self._columns)
        raise RuntimeError("this Hessian was released after its group was compressed")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of XᵀX, read from disk alone when it was spilled."""
        if self.xtx is not None or self._spilled is None:
            return self.matrix()[start:stop]
        import numpy as np

        stop = min(stop, self._columns)
        flat = np.fromfile(self._spilled, dtype=np.float32, count=(stop - start) * self._columns,
                           offset=start * self._columns * 4)
        return torch.from_numpy(flat).reshape(stop - start, self._columns)

    def spill(self) -> bool:
        """Write XᵀX to ``spill_dir`` and free it (a streamed run, while a method factors H: the
        difference between two and three ``[in, in]`` matrices in memory). The file is raw float32
        rows, a scratch copy this process writes and reads back itself. False without a dir."""
        if self.spill_dir is None or self.xtx is None:
            return False
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"xtx-{os.getpid()}-{id(self)}.f32"
        self._columns = self.xtx.shape[0]
        self.xtx.contiguous().numpy().tofile(path)  # written from the tensor's own memory, no copy
        self.xtx, self._spilled = None, path  # type: ignore[assignment]
        return True

    def release(self) -> None:
        """Free XᵀX (and its spilled copy) once a method has taken what it needs."""
        self.xtx = None  # type: ignore[assignment]
        self.drop_spilled()

    def drop_spilled(self) -> None:
        """Delete the spilled copy (the loop, once the group is compressed)."""
        if self._spilled is not None:
            self._spilled.unlink(missing_ok=True)
            self._spilled = None

    @property
    def sq(self) -> torch.Tensor:  # a Hessian also knows the column norms
        return torch.diagonal(self.matrix()).double()


class BlockMethod(Protocol):
    """What a calibrated method gives the loop. A method may also define
    ``block_io(block, x, out)``: it is then shown every batch's block input and dense output
    during the observation pass (ShortGPT's block influence needs both)."""

    def observer(self, name: str, module: nn.Module) -> Observer: ...

    def compress(self, name: str, module: nn.Module, stat: Any, block: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Options:
    propagate: str = "compressed"        # "compressed": next inputs from the compressed block; "dense"
    activation_dtype: str = "float32"    # dtype of stored calibration activations
    offload: bool = False                # keep activations on disk instead of in memory
    batch_size: int = 8                  # calibration sequences per forward
    device: str | None = None            # where a block is worked on (default: where it lives)
    checkpoint_dir: str | None = None    # resume state; None disables checkpointing
    record_error: bool = True
    compute_dtype: str | None = None     # run the calibration forwards in this dtype (None: the model's)
    error_batches: int = 1               # batches of the re-run on which errors a method did not give are measured
    block_hooks: Any = None              # streaming: .load(i, prefix, block) before a block, .done(...) after


@dataclass
class Result:
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    resumed_from: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Stop(Exception):
    pass


# --- activation storage ------------------------------------------------------------------------
class Activations:
    """Per-batch tensors in memory, or on disk as safetensors files (``offload``)."""

    def __init__(self, dtype: torch.dtype, directory: str | None = None):
        self.dtype, self.directory, self.items = dtype, directory, []  # type: ignore[var-annotated]

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", self.dtype).contiguous()
        if self.directory is None:
            self.items.append(x)
            return
        from safetensors.torch import save_file

        path = os.path.join(self.directory, f"{id(self)}-{len(self.items)}.safetensors")
        save_file({"x": x}, path)
        self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        if isinstance(item, torch.Tensor):
            return item
        from safetensors.torch import load_file

        return load_file(item)["x"]

    def stacked(self) -> torch.Tensor:
        return torch.cat([self[i] for i in range(len(self))])

    def drop(self) -> None:
        for item in self.items:
            if isinstance(item, str):
                os.unlink(item)
        self.items = []


# --- capture -------------------------------------------------------------------------------------
def _move(value: Any, device: Any, dtype: torch.dtype | None = None) -> Any:
    """Move block arguments to ``device``; floating tensors (rotary tables, additive masks) to ``dtype``."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int,
                   store: Activations, kind: str = "causal") -> list[dict[str, Any]]:
    """Run the model only up to its first block, per batch; store the hidden states, return the kwargs."""
    calls: list[dict[str, Any]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append(hidden)
        calls.append({"args": tuple(args[1:]), "kwargs": {k: v for k, v in kwargs.items() if k != "hidden_states"}})
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            try:
                if kind == "encoder":
                    model(input_ids=batch, attention_mask=torch.ones_like(batch))
                else:
                    model(input_ids=batch, use_cache=False)
            except _Stop:
                continue
            raise SecateurError("the model's forward never reached its first block; the architecture table "
                                "does not match this model")
    finally:
        handle.remove()
    return calls


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _dense_output(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the module computed with its dense ``[out, in]`` weight."""
    bias = getattr(module, "bias", None)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


# --- checkpoints -------------------------------------------------------------------------------
def _atomic_dir_write(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_checkpoint(directory: Path, block_index: int, block: nn.Module, prefix: str, inputs: Activations,
                     result: Result, weights: bool = True) -> None:
    """The block's weights (unless ``weights`` is False: a streamed run has written them already),
    the next block's inputs and the layer records, in ``directory/block-NNNN`` atomically."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        if weights:
            state = {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
            save_file(state, str(tmp / "weights.safetensors"))
        save_file({f"x{i}": inputs[i] for i in range(len(inputs))}, str(tmp / "inputs.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"next_block": block_index + 1, "layers": result.layers}))

    _atomic_dir_write(directory / f"block-{block_index:04d}", write)
    previous = directory / f"block-{block_index - 1:04d}" / "inputs.safetensors"
    if previous.exists():  # earlier inputs are no longer needed; weights stay for the resume
        previous.unlink()


def _load_checkpoint(model: nn.Module, directory: Path, store: Activations,
                     streamed: bool = False) -> tuple[int, dict[str, Any]]:
    """Restore every finished block's weights (not when ``streamed``: those blocks are written
    out and stay on the meta device) and the next inputs; returns (next block, records)."""
    from safetensors.torch import load_file

    done = sorted(p for p in directory.glob("block-*") if (p / "state.json").exists())
    if not done:
        return 0, {}
    last = done[-1]
    state = json.loads((last / "state.json").read_text())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for block_dir in [] if streamed else done:
            for name, tensor in load_file(str(block_dir / "weights.safetensors")).items():
                target = params.get(name, buffers.get(name))
                owner, _, attr = name.rpartition(".")
                try:
                    holder = model.get_submodule(owner) if owner else None
                except AttributeError:
                    holder = None
                if target is None and holder is not None and not hasattr(holder, attr):
                    # state a method attached to a module as a buffer (e.g. GPTQ's scales): restore it
                    holder.register_buffer(attr, tensor.clone())
                    continue
                if target is None or target.shape != tensor.shape:
                    raise SecateurError(f"checkpoint {block_dir} does not match this model ({name}); delete it to "
                                        "start over")
                target.copy_(tensor)
    inputs = load_file(str(last / "inputs.safetensors"))
    for i in range(len(inputs)):
        store.append(inputs[f"x{i}"])
    return int(state["next_block"]), state["layers"]


# --- a whole-model quality on calibration data (structured depth scores, mixed precision) --------
@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[torch.Tensor], kind: str,
                     reference: list[torch.Tensor] | None = None) -> tuple[float, list[torch.Tensor]]:
    """``(loss, outputs)`` over calibration ``batches``: for a causal LM the mean language-model
    loss; for an encoder 1 − mean token cosine between its final hidden states and ``reference``
    (the dense model's, returned as ``outputs`` by a call without one; the loss is then 0)."""
    total, outputs = 0.0, []
    for i, batch in enumerate(batches):
        if kind == "causal":
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss)
        else:
            h = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state.float()
            outputs.append(h)
            if reference is not None:
                total += float(1 - torch.nn.functional.cosine_similarity(h, reference[i], dim=-1).mean())
    return total / len(batches), outputs


# --- the loop ----------------------------------------------------------------------------------
def input_groups(arch: Any, block_prefix: str, names: list[str]) -> dict[str, list[str]]:
    """Targeted module names grouped by the input they read: group leader -> members."""
    roles = arch.projections() if arch is not None else {}
    path_to_role = {path: role for role, path in roles.items()}
    shared = {role: group for group in (arch.shared_inputs if arch is not None else ()) for role in group}
    groups: dict[str, list[str]] = {}
    leader_of: dict[tuple[str, ...], str] = {}
    for name in names:
        local = name[len(block_prefix) + 1:] if name.startswith(block_prefix + ".") else name
        group = shared.get(path_to_role.get(local, ""))
        if group is None:
            groups[name] = [name]
            continue
        leader = leader_of.setdefault(group, name)
        groups.setdefault(leader, []).append(name)
    return groups


def _in_features(module: nn.Module) -> int:
    from .models.layers import weight_matrix

    return weight_matrix(module).shape[1]


def calibration_ids(ctx: Any, method: str) -> torch.Tensor:
    """The run's calibration token ids ``[n, seq_len]`` (a CalibrationSet or a tensor), or a
    one-line error naming ``method`` and how a recipe gives it data."""
    data = getattr(ctx, "data", None)
    ids = getattr(data, "input_ids", data)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SecateurError(f"method '{method}' needs calibration data: a CalibrationSet or token ids [n, seq_len] "
                            "(in a recipe: data: {source: tinystories, samples: 128, seq_len: 256})")
    return ids


def options_for(config: Any, ctx: Any, propagate: str | None = None) -> Options:
    """The loop's options from a calibrated step's config (a :class:`~secateur.config.CalibratedConfig`)
    and the run context; ``propagate`` set: an extra observation pass (no checkpoints, no errors)."""
    return Options(propagate=propagate or config.propagate, activation_dtype=config.activation_dtype,
                   offload=config.offload, batch_size=config.batch_size, device=getattr(ctx, "device", None),
                   compute_dtype=config.compute_dtype,
                   block_hooks=getattr(ctx, "block_hooks", None) if propagate is None else None,
                   checkpoint_dir=getattr(ctx, "checkpoint_dir", None) if propagate is None else None,
                   record_error=propagate is None)


def sequential(model: nn.Module, input_ids: torch.Tensor, targets: dict[str, nn.Module], method: BlockMethod,
               options: Options = Options(), description: str = "calibrating") -> Result:
    """Walk ``model`` block by block over the calibration ``input_ids`` [n, seq_len]; see the module doc."""
    from .models.arch import arch_of

    facts = arch_of(model)
    arch = facts.arch
    blocks = arch.get_blocks(model)
    prefix = arch.block_prefix(model)
    act_dtype = DTYPES[options.activation_dtype]
    if options.compute_dtype and DTYPES[options.compute_dtype].itemsize < act_dtype.itemsize:
        # a block computed in bfloat16 returns bfloat16: storing it wider keeps no more information
        act_dtype = DTYPES[options.compute_dtype]
        options = dataclasses.replace(options, activation_dtype=options.compute_dtype)
    start_time = time.perf_counter()
    offload_dir = tempfile.mkdtemp(prefix="secateur-acts-") if options.offload else None
    result = Result(settings={"propagate": options.propagate, "activation_dtype": options.activation_dtype,
                              "compute_dtype": options.compute_dtype or str(next(model.parameters()).dtype),
                              "offload": options.offload, "batch_size": options.batch_size,
                              "samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                              "threads": torch.get_num_threads()})
    checkpoint = Path(options.checkpoint_dir) if options.checkpoint_dir else None
    rank, size = world()
    if size > 1:  # rank r takes global batches r, r + size, …; its resume state is its own
        batches = list(input_ids.split(options.batch_size))[rank::size]
        if not batches:
            raise SecateurError(f"{input_ids.shape[0]} calibration samples in batches of {options.batch_size} "
                                f"leave rank {rank} of {size} without a batch; use more samples or fewer processes")
        input_ids = torch.cat(batches)
        result.settings["processes"] = size
        if checkpoint is not None:
            checkpoint = checkpoint / f"rank-{rank}-of-{size}"
    try:
        inputs = Activations(act_dtype, offload_dir)
        calls = capture_inputs(model, blocks[0], input_ids, options.batch_size, inputs, arch.kind)
        first = 0
        hooks = options.block_hooks
        if checkpoint is not None and checkpoint.exists():
            resumed = Activations(act_dtype, offload_dir)
            first, layers = _load_checkpoint(model, checkpoint, resumed, streamed=hooks is not None)
            if hooks is not None and first > hooks.done_blocks():
                raise SecateurError(f"the resume state in {checkpoint} is past the streamed output (block {first} "
                                    f"of {len(blocks)} recorded, {hooks.done_blocks()} written); delete it to start over")
            if first:
                inputs.drop()
                inputs, result.layers, result.resumed_from = resumed, layers, first
                log.info("resuming %s at block %d of %d from %s", description, first, len(blocks), checkpoint)
        for index in track(range(first, len(blocks)), f"{description} (block)", total=len(blocks) - first):
            if hooks is not None:
                hooks.load(index, f"{prefix}.{index}", blocks[index])
            inputs = _run_block(model, blocks[index], index, f"{prefix}.{index}", calls, inputs, targets, method,
                                options, arch, result, offload_dir)
            if hooks is not None:  # streamed: the written block is the checkpoint's weights, so it comes first
                hooks.done(index, f"{prefix}.{index}", blocks[index])
            if checkpoint is not None:
                _save_checkpoint(checkpoint, index, blocks[index], f"{prefix}.{index}", inputs, result,
                                 weights=hooks is None)
        inputs.drop()
    finally:
        if offload_dir:
            shutil.rmtree(offload_dir, ignore_errors=True)
    result.seconds = time.perf_counter() - start_time
    from .progress import peak_rss_bytes

    result.peak_rss_mib = peak_rss_bytes() / 2**20
    return result


@torch.no_grad()
def _run_block(model: nn.Module, block: nn.Module, index: int, block_prefix: str, calls: list[dict[str, Any]],
               inputs: Activations, targets: dict[str, nn.Module], method: BlockMethod, options: Options,
               arch: Any, result: Result, offload_dir: str | None) -> Activations:
    import copy

    from .models.layers import sparsity_of, weight_matrix

    home = next(block.parameters()).device
    device = torch.device(options.device) if options.device else home
    block.to(device)
    names = [n for n in targets if n.startswith(block_prefix + ".")]
    local = {n: n[len(block_prefix) + 1:] for n in names}
    groups = input_groups(arch, block_prefix, names)
    stats = {leader: method.observer(leader, targets[leader]) for leader in groups}
    scratch = getattr(options.block_hooks, "scratch_dir", None)
    for stat in stats.values():
        if scratch is not None and hasattr(stat, "spill_dir"):
            stat.spill_dir = scratch
    act_dtype = DTYPES[options.activation_dtype]

    def runner() -> nn.Module:
        """The block as the calibration forwards run it: itself, or a copy in ``compute_dtype``."""
        if options.compute_dtype is None or DTYPES[options.compute_dtype] == next(block.parameters()).dtype:
            return block
        return copy.deepcopy(block).to(DTYPES[options.compute_dtype])

    def forward_all(module: nn.Module, store: Activations | None, after_first: Callable | None = None,
                    watch: Callable | None = None) -> None:
        dtype = next(module.parameters()).dtype
        for i, call in enumerate(calls):
            x = inputs[i].to(device, dtype)
            out = _output(module(x, *_move(call["args"], device, dtype), **_move(call["kwargs"], device, dtype)))
            if watch is not None:
                watch(index, x, out)
            if store is not None:
                store.append(out)
            if after_first is not None and i + 1 == options.error_batches:
                after_first()

    phases = result.settings.setdefault("phase_seconds", {})  # where a block's time goes, summed over blocks

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        phases[phase] = round(phases.get(phase, 0.0) + now - since, 4)
        return now

    clock = time.perf_counter()
    # 1. observe (the dense outputs are the next inputs when propagating dense)
    dense_block = runner()
    handles = [dense_block.get_submodule(local[leader]).register_forward_pre_hook(
        lambda module, args, leader=leader: stats[leader].update(args[0])) for leader in groups]
    dense_next = Activations(act_dtype, offload_dir) if options.propagate == "dense" else None
    try:
        forward_all(dense_block, dense_next, watch=getattr(method, "block_io", None))
    finally:
        for h in handles:
            h.remove()
    del dense_block

    # 2. compress, module by module, from the group's statistic (over several processes: the
    #    statistics summed first; a method whose modules are independent splits the input groups
    #    over the ranks, any other runs everywhere; then every rank takes its owner's result)
    clock = lap("observe", clock)
    rank, size = world()
    if size > 1:
        for leader, stat in stats.items():
            if not hasattr(stat, "reduce"):
                raise SecateurError(f"{type(method).__name__.strip('_')}: the statistic of {leader} ({type(stat).__name__}) cannot be "
                                    "combined over several processes; run this method in one process")
            stat.reduce()
    clock = lap("combine", clock)
    split = size > 1 and getattr(method, "independent_layers", False)
    owner = {leader: (i % size if split else 0) for i, leader in enumerate(groups)}
    # the dense weights the re-run measures errors against: copied just before each module is
    # compressed and kept only when its method reported no error of its own; a streamed run reads
    # them back from the input when needed instead (hooks.dense_weight), holding none
    dense_weights: dict[str, Any] = {}
    hooks = options.block_hooks
    keep_dense = options.record_error and not hasattr(hooks, "dense_weight")
    # one module at a time only where each module's compression touches that module alone and this
    # rank compresses them all; else (scales folded across a group, other ranks' modules) every copy
    # is taken before anything changes
    lazy = getattr(method, "independent_layers", False) and not split
    if keep_dense and not lazy:
        dense_weights = {n: weight_matrix(targets[n]).detach().clone() for n in names}
    for leader, members in groups.items():
        for name in members:
            if owner[leader] != rank and split:
                continue
            start = time.perf_counter()
            if keep_dense and lazy:
                dense_weights[name] = weight_matrix(targets[name]).detach().clone()
            info = method.compress(name, targets[name], stats[leader], index) or {}
            if "relative_error" in info:
                dense_weights.pop(name, None)
            info["sparsity"] = round(sparsity_of(targets[name].weight), 6)
            info["seconds"] = round(time.perf_counter() - start, 4)
            result.layers[name] = info
        if hasattr(stats[leader], "drop_spilled"):
            stats[leader].drop_spilled()
        del stats[leader]
    clock = lap("compress", clock)
    if size > 1:
        if split:
            for leader, members in groups.items():
                for name in members:
                    _broadcast_module(targets[name], owner[leader])
                    result.layers[name] = _broadcast_json(result.layers.get(name), owner[leader])
        else:  # the method may have rewritten more than its targets (norms folding scales): the whole block
            _broadcast_module(block, 0)

    clock = lap("share", clock)
    # 3. re-run the compressed block: the next inputs, and the errors the method did not measure
    #    itself, on the first ``error_batches`` batches (one extra matmul per module there only)
    to_measure = [n for n in names if options.record_error and "relative_error" not in result.layers[n]]
    errors = {n: [0.0, 0.0, 0] for n in to_measure}
    compressed_block = runner()

    def measure(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            y = out.reshape(-1, out.shape[-1]).float()
            dense = dense_weights[name] if name in dense_weights else hooks.dense_weight(name, module)
            ref = _dense_output(module, dense, x).float()
            errors[name][0] += float(((ref - y) ** 2).sum())
            errors[name][1] += float((ref ** 2).sum())
            errors[name][2] += x.shape[0]
        return hook

    handles = [compressed_block.get_submodule(local[n]).register_forward_hook(measure(n)) for n in to_measure]

    def stop_measuring() -> None:
        for h in handles:
            h.remove()
        handles.clear()

    next_inputs = dense_next
    try:
        if options.propagate == "compressed":
            next_inputs = Activations(act_dtype, offload_dir)
            forward_all(compressed_block, next_inputs, stop_measuring)
        elif to_measure:
            for i, call in enumerate(calls[:options.error_batches]):
                dtype = next(compressed_block.parameters()).dtype
                compressed_block(inputs[i].to(device, dtype), *_move(call["args"], device, dtype),
                                 **_move(call["kwargs"], device, dtype))
    finally:
        stop_measuring()
    if size > 1 and to_measure:  # every rank measured its own batches: the sums over all of them
        totals = all_reduce_(torch.tensor([errors[n][:2] for n in to_measure], dtype=torch.float64))
        counts = all_reduce_(torch.tensor([errors[n][2] for n in to_measure], dtype=torch.int64))
        for i, n in enumerate(to_measure):
            errors[n] = [float(totals[i, 0]), float(totals[i, 1]), int(counts[i])]
    lap("rerun", clock)
    for name in to_measure:
        err, ref, tokens = errors[name]
        result.layers[name]["relative_error"] = err / ref if ref > 0 else 0.0
        result.layers[name]["error_tokens"] = tokens
    inputs.drop()
    block.to(home)
    return next_inputs  # type: ignore[return-value]
