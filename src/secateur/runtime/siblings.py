"""Sibling GEMVs: quantized projections that read the same input decoded in one kernel call.

A decode step of a Llama block runs seven small GEMVs; q/k/v read the same normed hidden state and
so do gate/up (the architecture table's ``shared_inputs``). Each call pays a fixed price (operator
dispatch, waking the threads, quantizing or rounding ``x``) and a small weight splits badly over
the threads. :func:`link_siblings` concatenates the packed GEMV weights of such a group once, in
place: the members' own packed weights become views of the joint one, so no memory is added. A
member called with few tokens then computes the whole group's output with one call and returns its
slice:

* under ``torch.compile`` every member emits the same call on the same constant weights, and the
  compiler's common-subexpression pass keeps one. This is where linking pays, and
  :class:`~secateur.runtime.compiled.CompiledLM` links every model it compiles;
* eagerly, the joint output is kept with a copy of its input (a few tokens: kilobytes) and served
  to the next member whose input equals it, so the group costs one kernel call. The comparison,
  the copy and the Python around them cost more than the two saved calls: on the timing model an
  eager W8A8 decode was slower linked (a throwaway timing), so eager paths do not link.

The joint call gives each member exactly the floats of its own GEMV (the kernels compute each
16-channel block independently of the others), so linking changes speed, not results (tested).
Linking is a runtime step: nothing is saved, and changing any member's weights unlinks its group.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn as nn

from . import kernels, native

log = logging.getLogger(__name__)


class SiblingGemv:
    """The joint GEMV of one group: packed weights over all members, and the last output."""

    def __init__(self, kind: str, packed: Any, bias: Optional[torch.Tensor], tokens: int):
        self.kind, self.packed, self.bias, self.tokens = kind, packed, bias, tokens
        self.valid = True
        # eager only: (copy of x, joint output, members already given their slice of it)
        self._last: Optional[tuple[torch.Tensor, torch.Tensor, set[int]]] = None

    def __call__(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """``[tokens, in]`` -> ``[tokens, sum of the members' padded widths]`` float32, for the
        member whose slice starts at column ``member``. Eagerly, a joint output is served once to
        each member (a member asking again, whose slice a caller may have edited in place, gets
        a fresh one)."""
        compiling = torch.compiler.is_compiling()
        if not compiling and self._last is not None:
            seen, out, served = self._last
            if member not in served and seen.shape == x.shape and seen.dtype == x.dtype and torch.equal(seen, x):
                served.add(member)
                return out
        if self.kind == "w8a8":
            out = native.w8a8_gemv(x.float(), self.packed, self.bias)
        else:
            out = native.w4_gemv(x, self.packed, self.bias)
        if not compiling:
            self._last = (x.clone(), out, {member})
        return out


def _gemv_of(module: nn.Module) -> Optional[tuple[str, Any]]:
    """``(kind, packed GEMV weight)`` of a QuantLinear whose one-token kernel is secateur's GEMV
    (as measured for its shape on this machine), else None."""
    from .linear import QuantLinear

    if not isinstance(module, QuantLinear) or module.kernel == "reference" or module.kernel_for(1) != "gemv":
        return None
    return ("w8a8" if module.op == "w8a8" else "w4"), module.packed("gemv")


def _joint(kind: str, parts: list[Any]) -> tuple[Any, list[Any]]:
    """The concatenated packed weight and each member's packed weight as a view into it."""
    blocks = [p.w.shape[0] for p in parts]
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    lanes = native.LANES
    if kind == "w8a8":
        joint = native.W8A8Gemv(torch.cat([p.w for p in parts]), torch.cat([p.wsum for p in parts]),
                                torch.cat([p.scale for p in parts]), sum(blocks) * lanes)
        views = [native.W8A8Gemv(joint.w[s:s + b], joint.wsum[s * lanes:(s + b) * lanes],
                                 joint.scale[s * lanes:(s + b) * lanes], p.n)
                 for p, s, b in zip(parts, starts, blocks)]
    else:
        joint = native.W4Gemv(torch.cat([p.w for p in parts]), torch.cat([p.sc for p in parts]), parts[0].group,
                              sum(blocks) * lanes)
        views = [native.W4Gemv(joint.w[s:s + b], joint.sc[s:s + b], p.group, p.n)
                 for p, s, b in zip(parts, starts, blocks)]
    return joint, views


def link_siblings(model: nn.Module) -> int:
    """Link the quantized projections of each block that read the same input (the architecture's
    ``shared_inputs``) into one GEMV for few-token calls; returns the number of groups linked.

    A group is linked when all its members are :class:`~secateur.runtime.linear.QuantLinear` modules
    with the same GEMV kernel (secateur's native W4A16 with one group size, or W8A8), the same
    input width, and either all or none with a bias. Others are left as they are. Models the
    architecture table does not know are left unchanged (0)."""
    from ..models.arch import arch_of

    facts = arch_of(model, strict=False)
    if facts is None or not native.available():
        return 0
    roles = facts.arch.projections()
    linked = 0
    for block in facts.arch.get_blocks(model):
        for group in facts.arch.shared_inputs:
            if any(role not in roles for role in group):
                continue
            try:
                members = [block.get_submodule(roles[role]) for role in group]
            except AttributeError:
                continue
            found = [_gemv_of(m) for m in members]
            if any(f is None for f in found):
                continue
            kinds = {f[0] for f in found}
            parts = [f[1] for f in found]
            biased = {m.bias is not None for m in members}
            if len(kinds) != 1 or len(biased) != 1 or len({m.in_features for m in members}) != 1 or \
                    len({getattr(p, "group", None) for p in parts}) != 1:
                continue
            kind = kinds.pop()
            joint, views = _joint(kind, parts)
            bias = None
            if biased.pop():
                bias = torch.cat([torch.nn.functional.pad(m.bias.detach().float(), (0, p.w.shape[0] * native.LANES - p.n))
                                  for m, p in zip(members, parts)])
            sibling = SiblingGemv(kind, joint, bias, kernels.FEW_TOKENS)
            start = 0
            for member, part, view in zip(members, parts, views):
                slot = member._slot
                slot.packs["gemv"] = view
                slot.entries = {b: (e[0], e[1], view) if e and e[0] == "gemv" else e  # the view, in place
                                for b, e in slot.entries.items()}
                member._sibling = (sibling, start, part.n)
                start += part.w.shape[0] * native.LANES
            linked += 1
    if linked:
        log.debug("linked %d groups of sibling GEMVs", linked)
    return linked


__all__ = ["SiblingGemv", "link_siblings"]
