"""secateur's own CPU kernels (``csrc/``), registered as ``torch.ops.secateur.*``:

- ``gemv.cpp``: few-token W8A8 and W4A16 matmuls that stream the packed weights near the memory
  bandwidth (AVX-512 VNNI and BF16 dot products), and the one-pass per-token quantization and
  rescale epilogue of the many-token W8A8 path;
- ``attention.cpp``: one-query decode attention over the allowed positions of a KV cache (used by
  :mod:`secateur.runtime.decode_attention`);
- ``encoder.cpp``: the row-wise passes between the int8 GEMMs of a W8A8 post-norm encoder layer,
  each fused into one (used by :mod:`secateur.runtime.fused_encoder`);
- ``simd.h``: the AVX-512 helpers they share.

The C++ files are compiled on first use with torch's extension builder (a C++ compiler and ninja
are needed) into ``$SECATEUR_CACHE_DIR/kernels`` (default ``~/.cache/secateur/kernels``) and reused
after that; they are rebuilt when a source or torch changes. Where they cannot be built or the CPU
lacks AVX-512 VNNI/BF16, :func:`available` is False and :mod:`secateur.runtime.kernels` keeps using
torch's own kernels (and attention stays on sdpa). ``SECATEUR_NATIVE=0`` turns them off.

Weight layouts (made once per module by the ``pack_*`` functions, never saved; the checkpoint
keeps the compressed-tensors format):

- W8A8: int8 ``[blocks, K/4, 16, 4]``: 16 output channels side by side, 4 consecutive inputs
  each (one VPDPBUSD operand), plus ``sum_k w[n, k]`` per channel (the activations are stored
  with a +128 offset) and the float32 scales.
- W4A16: uint8 ``[blocks, K/4, 32]``: byte ``2c + t`` of k-quad ``j`` holds ``q + 8`` of channel
  ``c`` at input ``4j + t`` (low nibble) and ``4j + 2 + t`` (high nibble); scales as float32
  ``[blocks, groups, 2, 16]`` = (``s``, ``s * (136 + zp)``), see the C++ file for why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import NamedTuple, Optional

import torch

log = logging.getLogger(__name__)

LANES = 16
SOURCES = [Path(__file__).with_name("csrc") / name for name in ("gemv.cpp", "attention.cpp", "encoder.cpp")]
HEADERS = [Path(__file__).with_name("csrc") / "simd.h"]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16", "-ffp-contract=off",
         "-fopenmp"]


def cache_dir() -> Path:
    root = os.environ.get("SECATEUR_CACHE_DIR") or Path.home() / ".cache" / "secateur"
    return Path(root) / "kernels"


def _build() -> None:
    import shutil

    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip wheel's binary, when this venv's bin is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(FLAGS).encode() +
                            torch.__version__.encode()).hexdigest()
    name = f"secateur_gemv_{digest[:12]}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                       build_directory=str(build), is_python_module=False, verbose=False)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the kernels are built, loaded and this CPU runs them (decided once per process)."""
    if os.environ.get("SECATEUR_NATIVE", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        if not hasattr(torch.ops.secateur, "w8a8_encoder_attention"):
            _build()
        ok = bool(torch.ops.secateur.supported())
    except Exception as exc:  # no compiler / ninja, an old compiler, a sandbox without a cache dir
        log.warning("secateur's native kernels could not be built or loaded (%s): the W8A8 and W4A16 GEMVs "
                    "fall back to torch's kernels, decode attention to sdpa, and W8A8 encoders run module by "
                    "module (slower, same results); SECATEUR_NATIVE=0 turns them off without this warning",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    if ok:
        _register_fakes()
    return ok


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the kernels themselves run as opaque calls)."""
    @torch.library.register_fake("secateur::w8a8_gemv")
    def _w8a8(x, w, wsum, scale, bias, n):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("secateur::w4_gemv")
    def _w4(x, w, sc, group, bias, n):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("secateur::quantize_per_token")
    def _quantize(x):  # noqa: ANN001, ANN202
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1))

    @torch.library.register_fake("secateur::decode_attention")
    def _attention(q, k, v, mask, scale):  # noqa: ANN001, ANN202
        return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))

    @torch.library.register_fake("secateur::w8a8_epilogue")
    def _epilogue(y, xs, bias, ws=None):  # noqa: ANN001, ANN202
        return torch.empty_like(y, dtype=torch.float32)

    @torch.library.register_fake("secateur::w8a8_gelu_quantize")
    def _gelu_quantize(y, xs, bias, ws=None):  # noqa: ANN001, ANN202
        return torch.empty_like(y, dtype=torch.int8), y.new_empty((y.shape[0], 1), dtype=torch.float32)

    @torch.library.register_fake("secateur::w8a8_encoder_attention")
    def _encoder_attention(y, xs, bias, mask, batch, heads, scale, ws=None):  # noqa: ANN001, ANN202
        return y.new_empty((y.shape[0], y.shape[1] // 3), dtype=torch.float32)

    @torch.library.register_fake("secateur::w8a8_residual_layernorm")
    def _residual_layernorm(y, xs, bias, residual, gamma, beta, eps, quantize, ws=None):  # noqa: ANN001, ANN202
        rows = y.shape[0] if quantize else 0
        return (torch.empty_like(y, dtype=torch.float32), y.new_empty((rows, y.shape[1]), dtype=torch.int8),
                y.new_empty((rows, 1), dtype=torch.float32))


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[0]) % LANES
    return t if not pad else torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])


# --- W8A8 ----------------------------------------------------------------------------------------

class W8A8Gemv(NamedTuple):
    w: torch.Tensor  # int8 [blocks, K/4, 16, 4]
    wsum: torch.Tensor  # int32 [blocks * 16]
    scale: torch.Tensor  # float32 [blocks * 16]
    n: int


def pack_w8a8(q: torch.Tensor, scale: torch.Tensor) -> Optional[W8A8Gemv]:
    """Per-channel int8 weights without zero points (``q`` int8 ``[out, in]``, ``scale [out]``);
    None when ``in`` is not a multiple of 4."""
    out, k = q.shape
    if k % 4:
        return None
    w = _pad_rows(q.to(torch.int8))
    blocks = w.shape[0] // LANES
    packed = w.reshape(blocks, LANES, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    wsum = w.to(torch.int32).sum(1, dtype=torch.int32).contiguous()
    s = _pad_rows(scale.reshape(-1).float()).contiguous()
    return W8A8Gemv(packed, wsum, s, out)


def w8a8_gemv(x: torch.Tensor, w: W8A8Gemv, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[tokens, in]`` float32 -> ``[tokens, out]`` float32 (per-token int8 activations)."""
    return torch.ops.secateur.w8a8_gemv(x, w.w, w.wsum, w.scale, bias, w.n)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`secateur.runtime.kernels.quantize_per_token` in one pass per row (the same int8
    integers and float32 ``[rows, 1]`` scales); ``x`` 2-D float32."""
    return torch.ops.secateur.quantize_per_token(x)


# In the four functions below ``y`` is a GEMM's float32 output with the weight scales applied, or
# its int32 products (``torch._int_mm``) with the weight scales ``ws`` still to apply: float(y) * ws
# is then formed as the row is read (the floats of ``torch.mul(y, ws)``, without that pass).

def w8a8_epilogue(y: torch.Tensor, xs: torch.Tensor, bias: Optional[torch.Tensor],
                  ws: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y * xs + bias`` per row as one FMA (``torch.addcmul(bias, y, xs)``'s floats), ``y * xs``
    without a bias; ``y`` 2-D float32 (or int32 with ``ws``), ``xs`` one float per row."""
    return torch.ops.secateur.w8a8_epilogue(y, xs, bias, ws)


def w8a8_gelu_quantize(y: torch.Tensor, xs: torch.Tensor, bias: Optional[torch.Tensor],
                       ws: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token(gelu(y * xs + bias))`` in one pass per row (GELU with erf to 3e-7
    absolute; times the reciprocal of the scale, which may move a value within a float ulp of a
    half step); ``y`` contiguous 2-D float32 (or int32 with ``ws``), ``xs`` one float per row."""
    return torch.ops.secateur.w8a8_gelu_quantize(y, xs, bias, ws)


def w8a8_encoder_attention(y: torch.Tensor, xs: torch.Tensor, bias: Optional[torch.Tensor],
                           mask: Optional[torch.Tensor], batch: int, heads: int, scale: float,
                           ws: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Self-attention from a joint q/k/v GEMM output ``y [batch * length, 3 * heads * head_dim]``
    (rescaled by ``xs`` and ``bias`` as it is read; ``mask`` bool, broadcastable to ``[batch, heads,
    length, length]``, True where a query may attend; ``scale`` multiplies q). Returns ``[batch *
    length, heads * head_dim]``; head_dim must be a multiple of 16."""
    return torch.ops.secateur.w8a8_encoder_attention(y, xs, bias, mask, batch, heads, scale, ws)


def w8a8_residual_layernorm(y: torch.Tensor, xs: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                            norm: torch.nn.LayerNorm, quantize: bool,
                            ws: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = norm(y * xs + bias + residual)`` in one pass per row, and with ``quantize`` also
    ``quantize_per_token(h)`` (else two empty tensors); ``y`` (int32 with ``ws``) and ``residual``
    contiguous 2-D float32."""
    return torch.ops.secateur.w8a8_residual_layernorm(y, xs, bias, residual, norm.weight, norm.bias, float(norm.eps),
                                                      quantize, ws)


# --- W4A16 ---------------------------------------------------------------------------------------

class W4Gemv(NamedTuple):
    w: torch.Tensor  # uint8 [blocks, K/4, 32]
    sc: torch.Tensor  # float32 [blocks, groups, 2, 16]
    group: int
    n: int


def pack_w4(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
            group_size: Optional[int]) -> Optional[W4Gemv]:
    """``q`` in [-8, 7] ``[out, in]`` with ``scale``/``zero_point`` ``[out, groups]``; None when the
    group (or ``in`` per channel) is not a multiple of 16 or ``q`` leaves 4 bits."""
    out, k = q.shape
    group = group_size or k
    if group % 16 or k % group or int(q.min()) < -8 or int(q.max()) > 7:
        return None
    u = _pad_rows((q.to(torch.int16) + 8).to(torch.uint8))
    blocks = u.shape[0] // LANES
    quads = u.reshape(blocks, LANES, k // 4, 4).permute(0, 2, 1, 3)  # [blocks, K/4, 16, 4]
    packed = (quads[..., 0:2] | (quads[..., 2:4] << 4)).reshape(blocks, k // 4, 2 * LANES).contiguous()
    s = scale.float().reshape(out, -1)
    zp = torch.zeros_like(s) if zero_point is None else zero_point.float().reshape(out, -1)
    sc = torch.stack([s, s * (136.0 + zp)], dim=-1)  # [out, groups, 2]
    sc = _pad_rows(sc).reshape(blocks, LANES, k // group, 2).permute(0, 2, 3, 1).contiguous()
    return W4Gemv(packed, sc, group, out)


def w4_gemv(x: torch.Tensor, w: W4Gemv, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``[tokens, in]`` float32 or bf16 -> ``[tokens, out]`` float32 (bf16-rounded activations)."""
    return torch.ops.secateur.w4_gemv(x, w.w, w.sc, w.group, bias, w.n)


__all__ = ["available", "cache_dir", "pack_w8a8", "w8a8_gemv", "quantize_per_token", "w8a8_epilogue",
           "w8a8_gelu_quantize", "w8a8_residual_layernorm", "w8a8_encoder_attention", "pack_w4", "w4_gemv", "W8A8Gemv", "W4Gemv"]
