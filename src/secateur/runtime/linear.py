"""``QuantLinear``: the module that replaces an ``nn.Linear`` once its weight is quantized.

It holds the integers and their scales as buffers — the only state it saves:

``weight_q``           int8 ``[out, in]``, the (unpacked) signed integers of ``bits`` bits
``weight_scale``       float ``[out, G]``, ``G = 1`` per output channel or ``in / group_size``
``weight_zero_point``  int8 ``[out, G]`` (zeros when symmetric)
``bias``               the Linear's bias, or None

with ``w = (weight_q - weight_zero_point) * weight_scale`` (:mod:`secateur.quant.primitives`'
convention). ``activation`` is None (weight-only: W4A16, W8A16, ...) or ``"int8"`` (W8A8: the
input is quantized per token on the fly, symmetric int8, one scale per row, so a token's output
never depends on the rest of the batch).

``forward`` runs a real low-precision CPU kernel of :mod:`secateur.runtime.kernels`, the one
measured fastest for this shape and token bucket on this machine (:mod:`secateur.runtime.dispatch`:
oneDNN, ``torch._int_mm``, torch's packed GEMVs, bf16 dequantize + GEMM, secateur's GEMVs, or the
float32 candidate when nothing quantized beats it), packed on first use and cached on the module
(not in the state dict). The weight-only bf16 kernels differ from the reference by bf16 rounding;
the W8A8 kernels (its float32 candidate included) compute the exact integer products and differ
only by float rounding, and give the same floats as each other. Set ``module.use_kernels = False``
or run inside ``with reference_only():`` for the reference path (dequantize, then ``F.linear``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SecateurError
from . import kernels

log = logging.getLogger(__name__)

ACTIVATIONS = (None, "int8")
_FAST_DTYPES = (torch.float32, torch.bfloat16)
_REFERENCE_ONLY: ContextVar[bool] = ContextVar("secateur_reference_only", default=False)


@contextmanager
def reference_only() -> Iterator[None]:
    """Every QuantLinear (and FP8Linear) run *by this thread or task* takes its reference path
    (dequantize, then ``F.linear``) inside the block; a context variable, so one request of a
    threaded server can never change another's kernels. Compiled graphs (``torch.compile``) are
    traced with the kernels and are not switched by it."""
    token = _REFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def reference_only_active() -> bool:
    """Whether the calling thread or task is inside :func:`reference_only` (never while compiling)."""
    return not torch.compiler.is_compiling() and _REFERENCE_ONLY.get()


class QuantLinear(nn.Module):
    """A Linear layer with integer weights (see the module docstring)."""

    use_kernels = True  # False: always the reference path (per instance, or on the class)

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: Optional[int] = None,
                 activation: Optional[str] = None, bias: bool = True, *, scale_dtype: torch.dtype = torch.float32,
                 device: Any = None):
        super().__init__()
        _check_scheme(in_features, bits, group_size, activation)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.activation = bits, group_size, activation
        groups = in_features // group_size if group_size else 1
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._slot: Any = None  # kernels.KernelSlot: the kernel chosen per token bucket, packed (made on first use)
        self._gemm: Any = None  # kernels.W8A8Gemm for the fused encoder, sharing the slot's packs
        self._sibling: Any = None  # (SiblingGemv, first column, width) once linked (quant.siblings)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int,
                       group_size: Optional[int], bias: Optional[torch.Tensor] = None,
                       activation: Optional[str] = None) -> "QuantLinear":
        """The module holding ``q`` (int8 ``[out, in]``), ``scale`` (``[out, G]``), ``zero_point``
        (integers ``[out, G]``, or None when symmetric) and ``bias``."""
        if q.dim() != 2 or q.dtype != torch.int8:
            raise SecateurError(f"q must be an int8 [out, in] tensor, got {q.dtype} of shape {tuple(q.shape)}")
        out_features, in_features = q.shape
        _check_scheme(in_features, bits, group_size, activation)
        groups = in_features // group_size if group_size else 1
        if not scale.is_floating_point() or tuple(scale.shape) != (out_features, groups):
            raise SecateurError(f"scale must be a float [{out_features}, {groups}] tensor, got {scale.dtype} "
                                f"of shape {tuple(scale.shape)}")
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
            raise SecateurError(f"{bits}-bit integers must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]")
        if zero_point is None:
            zero_point = torch.zeros(out_features, groups, dtype=torch.int8, device=q.device)
        elif tuple(zero_point.shape) != (out_features, groups) or zero_point.is_floating_point() or \
                (zero_point.numel() and (int(zero_point.min()) < lo or int(zero_point.max()) > hi)):
            raise SecateurError(f"zero_point must hold integers in [{lo}, {hi}] of shape [{out_features}, {groups}], "
                                f"got {zero_point.dtype} of shape {tuple(zero_point.shape)}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise SecateurError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
        module = cls(in_features, out_features, bits, group_size, activation, bias is not None,
                     scale_dtype=scale.dtype, device="meta")
        module.weight_q = q.detach().contiguous()
        module.weight_scale = scale.detach().contiguous()
        module.weight_zero_point = zero_point.detach().to(torch.int8).contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    # --- the reference ---------------------------------------------------------------------------

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - zero_point) * scale`` in float32 (each scale over its group), then ``dtype``."""
        scale = self.weight_scale.float()
        out, groups = scale.shape
        q = self.weight_q.float().view(out, groups, -1)
        weight = (q - self.weight_zero_point.float().unsqueeze(-1)) * scale.unsqueeze(-1)
        return weight.view(out, -1).to(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then ``F.linear`` (W8A8: on ``x`` quantized per token and dequantized)."""
        if self.activation == "int8":
            xq, xs = kernels.quantize_per_token(x)
            x = (xq.float() * xs).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    # --- the kernels -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reference_only_active() or not self.use_kernels or x.device.type != "cpu" or x.dtype not in _FAST_DTYPES \
                or (x.requires_grad and torch.is_grad_enabled()) or x.shape[-1] != self.in_features:
            return self.reference_forward(x)  # (a wrong width: F.linear's error)
        x2 = x.reshape(-1, self.in_features)
        entry = self._entry(x2.shape[0])
        if entry is None:
            return self.reference_forward(x)
        name, candidate, packed = entry
        sibling = self._sibling
        if sibling is not None and name == "gemv" and sibling[0].valid and x2.shape[0] <= sibling[0].tokens:
            group, start, width = sibling
            out = group(x2, start)[:, start:start + width].to(x.dtype)
        else:
            out = candidate.run(x2, packed, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _entry(self, tokens: int) -> Any:
        """``(kernel name, candidate, packed weight)`` for ``tokens`` rows, chosen once per token
        bucket (:class:`~secateur.runtime.kernels.KernelSlot`); None: the reference path."""
        slot = self._get_slot()
        return None if slot is None else slot.entry(tokens, self.weight_q, self.weight_scale, self.weight_zero_point)

    def _get_slot(self) -> Any:
        """This module's :class:`~secateur.runtime.kernels.KernelSlot`, made on first use (None where
        no kernel applies: no operation for the scheme, or a weight off the CPU)."""
        if self._slot is None and self.op is not None and self.weight_q.device.type == "cpu":
            self._slot = kernels.KernelSlot(self.op, self.kernel_shape, self.group_size)
        return self._slot

    @property
    def op(self) -> Optional[str]:
        """The dispatcher's operation for this scheme (``"w8a8"``, ``"w4a16"``, ``"w8a16"``), or None."""
        return kernels.op_of(self.bits, self.activation, self.group_size)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape key kernel choices are measured and cached under."""
        shape = (self.in_features, self.out_features)
        return shape + (self.group_size,) if self.op == "w4a16" and self.group_size else shape

    @property
    def kernel(self) -> str:
        """The operation ``forward`` runs on float32 CPU input (``"reference"`` when no kernel applies)."""
        if reference_only_active() or not self.use_kernels or self.op is None:
            return "reference"
        return self.op

    def kernel_for(self, tokens: int) -> str:
        """The kernel ``forward`` runs for ``tokens`` rows of float32 CPU input (chosen, and packed, now)."""
        if self.kernel == "reference":
            return "reference"
        entry = self._entry(tokens)
        return entry[0] if entry else "reference"

    def prepare(self, *tokens: int) -> None:
        """Choose and pack the kernels for these token counts now (e.g. before ``torch.compile``,
        which cannot measure or pack while it traces)."""
        for t in tokens:
            self.kernel_for(t)

    def secateur_kernels(self) -> dict[str, dict[int, str]]:
        """The kernels chosen so far, by token bucket (read by :func:`secateur.runtime.dispatch.summary`)."""
        chosen = self._slot.chosen() if self._slot is not None else {}
        report = {self.op: chosen} if chosen else {}
        if self._gemm is not None:  # the fused encoder's GEMM of this weight
            report.update(self._gemm.secateur_kernels())
        return report

    def packed(self, name: str) -> Any:
        """This module's weight packed for candidate ``name`` (None where that kernel cannot take it)."""
        slot = self._get_slot()
        return None if slot is None else slot.pack(name, self.weight_q, self.weight_scale, self.weight_zero_point)

    def gemm(self) -> Any:
        """The weight as a :class:`~secateur.runtime.kernels.W8A8Gemm` (W8A8 only), sharing this
        module's packs: the fused encoder's GEMM never packs a weight the module already has."""
        slot = self._get_slot()
        if self.op != "w8a8" or slot is None:
            return None
        if self._gemm is None:
            self._gemm = kernels.W8A8Gemm(self.weight_q, self.weight_scale, self.weight_zero_point, packs=slot.packs)
        return self._gemm

    def reset_kernel(self) -> None:
        """Drop the packed weights (repacked on the next forward): call after editing the buffers in place."""
        self._slot = self._gemm = None
        self._unlink()

    def _unlink(self) -> None:
        if self._sibling is not None:
            self._sibling[0].valid = False  # the group's joint weight no longer matches this member
            self._sibling = None

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":  # .to(), .cuda(), .half()...
        self.reset_kernel()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.reset_kernel()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # copy / pickle without the packed (oneDNN) tensors
        state = dict(super().__getstate__())
        state["_slot"], state["_gemm"], state["_sibling"] = None, None, None
        return state

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}, "
                f"activation={self.activation}, bias={self.bias is not None}")


def _check_scheme(in_features: int, bits: int, group_size: Optional[int], activation: Optional[str]) -> None:
    if not 2 <= bits <= 8:
        raise SecateurError(f"bits must be 2..8, got {bits}")
    if activation not in ACTIVATIONS:
        raise SecateurError(f"activation must be None (weight-only) or 'int8' (W8A8), got {activation!r}")
    if group_size is not None and (group_size < 1 or in_features % group_size):
        raise SecateurError(f"group_size {group_size} does not divide in_features {in_features}")
    if activation == "int8" and group_size is not None:
        raise SecateurError("int8 activations (W8A8) need per-channel weight scales (group_size None), "
                            f"got group_size {group_size}")


__all__ = ["QuantLinear", "reference_only", "reference_only_active"]
