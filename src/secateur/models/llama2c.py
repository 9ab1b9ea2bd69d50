"""Import llama2.c checkpoints as Hugging Face Llama models.

    path = import_llama2c("stories15M.bin", "tokenizer.model", "out/stories15M")
    model, tokenizer, arch = secateur.load(path)

`llama2.c <https://github.com/karpathy/llama2.c>`_ trains small Llama models and exports them as
one flat binary file that its C runtime reads with pointer arithmetic: a few int32 of header, then
every weight as raw little-endian numbers, tensor after tensor, in a fixed order and with no names.
The shapes follow from the header alone, so reading a file back is a matter of walking the same
order. Three layouts exist:

* version 0 (legacy, what ``run.c`` reads): 7 int32 (dim, hidden_dim, n_layers, n_heads,
  n_kv_heads, vocab_size, max_seq_len; a negative vocab_size means the classifier is stored at
  the end instead of being shared with the token embedding), then float32 token embedding, the
  per-layer attention norms, wq, wk, wv, wo, FFN norms, w1, w2, w3, the final norm, the rotary
  cos/sin tables and, when not shared, the classifier;
* version 1: a 256-byte header (magic ``ak42``, version, the same 7 int32, a shared-classifier
  byte), then float32 norms first, embedding, wq, wk, wv, wo, w1, w2, w3 and maybe the classifier;
* version 2 (``runq.c``): the same header plus a group size, float32 norms, then every matrix as
  int8 followed by all float32 group scales (symmetric Q8_0); it is dequantized to float32 here.

The weights map one to one onto ``LlamaForCausalLM`` except for the rotary embedding: llama2.c
rotates interleaved pairs of a head's channels (0,1), (2,3), ... whereas Hugging Face rotates the
first half of the head against the second half. Reordering the rows of wq and wk within each head
(even rows first, then odd rows) turns one convention into the other, so attention computes exactly
the same scores. The SentencePiece tokenizer becomes a tokenizers-backed ``LlamaTokenizer``: the
piece table is the vocabulary and the BPE merges are recovered from it (every split of a piece
into two pieces, ranked by the merged piece's id, which is its rank in SentencePiece BPE). It splits
text like SentencePiece does, with one known exception inherited from the Hugging Face Llama
tokenizer: text that begins with whitespace gets no extra dummy "▁" prefix.

The result is written with ``save_pretrained`` (safetensors only) into a temporary sibling and
renamed into place, so an interrupted import leaves nothing at the target.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SecateurError

log = logging.getLogger(__name__)

MAGIC = 0x616B3432            # "ak42" read as a little-endian uint32: header of versions 1 and 2
_V1_HEADER_BYTES = 256
_ROPE_THETA = 10000.0         # what llama2.c trains and runs with
_RMS_NORM_EPS = 1e-5          # llama2.c's ModelArgs.norm_eps and run.c's rmsnorm epsilon
_NEED_SENTENCEPIECE = "the llama2.c importer needs sentencepiece: pip install 'secateur[llama2c]'"

# Tensor order inside the file, per export version. Per-layer tensors are stored layer after layer.
_ORDER = {
    0: ("embed", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "final_norm",
        "freq_real", "freq_imag", "wcls"),
    1: ("attn_norm", "ffn_norm", "final_norm", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"),
    2: ("attn_norm", "ffn_norm", "final_norm", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"),
}
_FP32_IN_V2 = ("attn_norm", "ffn_norm", "final_norm")   # everything else is Q8_0 in version 2
_VERSIONS = "0 (legacy fp32), 1 (fp32) and 2 (int8 Q8_0)"


@dataclass(frozen=True)
class Header:
    """What the header of a llama2.c checkpoint says."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool
    group_size: int = 0       # Q8_0 group size, version 2 only
    data_offset: int = 28     # where the first tensor starts

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def describe(self) -> str:
        return (f"v{self.version}: dim={self.dim} hidden_dim={self.hidden_dim} n_layers={self.n_layers} "
                f"n_heads={self.n_heads} n_kv_heads={self.n_kv_heads} vocab_size={self.vocab_size} "
                f"max_seq_len={self.max_seq_len} shared_classifier={self.shared_classifier}")

    def tensors(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(name, count, shape) in file order; ``count`` is n_layers for per-layer tensors."""
        d, f, n, v, hd = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.head_dim
        shapes = {
            "embed": (1, (v, d)), "attn_norm": (n, (d,)),
            "wq": (n, (self.n_heads * hd, d)), "wk": (n, (self.n_kv_heads * hd, d)),
            "wv": (n, (self.n_kv_heads * hd, d)), "wo": (n, (d, self.n_heads * hd)),
            "ffn_norm": (n, (d,)), "w1": (n, (f, d)), "w2": (n, (d, f)), "w3": (n, (f, d)),
            "final_norm": (1, (d,)), "freq_real": (1, (self.max_seq_len, hd // 2)),
            "freq_imag": (1, (self.max_seq_len, hd // 2)), "wcls": (1, (v, d)),
        }
        names = [name for name in _ORDER[self.version] if name != "wcls" or not self.shared_classifier]
        return [(name, *shapes[name]) for name in names]

    def expected_bytes(self) -> int:
        total = self.data_offset
        for name, count, shape in self.tensors():
            numel = count * math.prod(shape)
            if self.version == 2 and name not in _FP32_IN_V2:
                total += numel + 4 * (numel // self.group_size)   # int8 values + one fp32 scale per group
            else:
                total += 4 * numel
        return total


def read_header(path: Path) -> Header:
    """Parse and sanity-check the header of a llama2.c checkpoint."""
    with open(path, "rb") as fh:
        head = fh.read(_V1_HEADER_BYTES)
    if len(head) < 28:
        raise SecateurError(f"'{path}' is {len(head)} bytes, too short to be a llama2.c checkpoint")
    (first,) = struct.unpack_from("<I", head, 0)
    if first == MAGIC:
        if len(head) < _V1_HEADER_BYTES:
            raise SecateurError(f"'{path}' has a llama2.c 'ak42' magic but its header is cut short "
                                f"({len(head)} of {_V1_HEADER_BYTES} bytes)")
        (version,) = struct.unpack_from("<i", head, 4)
        if version not in (1, 2):
            raise SecateurError(f"'{path}' is a llama2.c checkpoint of export version {version}; "
                                f"supported versions: {_VERSIONS}")
        dims = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        offset = _V1_HEADER_BYTES
    else:
        version, dims, group_size, offset = 0, struct.unpack_from("<7i", head, 0), 0, 28
        shared = dims[5] > 0
        dims = (*dims[:5], abs(dims[5]), dims[6])
    header = Header(version, *dims, shared_classifier=shared, group_size=group_size, data_offset=offset)

    dim, hidden, layers, heads, kv_heads, vocab, seq = dims
    if min(dims) <= 0 or dim % heads or heads % kv_heads or header.head_dim % 2:
        raise SecateurError(f"'{path}' does not look like a llama2.c checkpoint: its header reads "
                            f"dim={dim} hidden_dim={hidden} n_layers={layers} n_heads={heads} "
                            f"n_kv_heads={kv_heads} vocab_size={vocab} max_seq_len={seq}")
    if version == 2:
        matrices = [(n, c, s) for n, c, s in header.tensors() if n not in _FP32_IN_V2]
        if group_size <= 0 or any(math.prod(shape) % group_size for _, _, shape in matrices):
            raise SecateurError(f"'{path}' has Q8_0 group size {group_size}, which does not divide its "
                                f"weight matrices ({header.describe()})")
    return header


def _read_tensors(path: Path, header: Header) -> dict[str, list[np.ndarray]]:
    """Every tensor of the file as float32 arrays, by name, one array per layer."""
    out: dict[str, list[np.ndarray]] = {}
    quantized: list[tuple[str, int, tuple[int, ...], np.ndarray]] = []
    with open(path, "rb") as fh:
        fh.seek(header.data_offset)

        def take(dtype: str, numel: int) -> np.ndarray:
            arr = np.fromfile(fh, dtype=dtype, count=numel)
            if arr.size != numel:   # the size was checked; this only guards a file changing under us
                raise SecateurError(f"'{path}' ended early while reading its weights")
            return arr

        for name, count, shape in header.tensors():
            numel = math.prod(shape)
            if header.version == 2 and name not in _FP32_IN_V2:
                quantized.extend((name, count, shape, take("i1", numel)) for _ in range(count))
                continue
            out[name] = [take("<f4", numel).reshape(shape) for _ in range(count)]
        for name, _, shape, q in quantized:   # version 2: all the scales come after all the int8 values
            scales = take("<f4", q.size // header.group_size)
            w = (q.reshape(-1, header.group_size).astype(np.float32) * scales[:, None]).reshape(shape)
            out.setdefault(name, []).append(w)
    return out


def _rope_theta(real: np.ndarray, imag: np.ndarray, head_dim: int) -> float:
    """Version 0 files carry the rotary cos/sin tables; read the base they were made with back.

    Position 1 of pair 1 holds the angle ``theta ** (-2 / head_dim)``. The value is accepted only if
    it reproduces the whole table; otherwise llama2.c's own 10000 is used (``run.c`` ignores the table).
    """
    if real.shape[0] < 2 or head_dim < 4:
        return _ROPE_THETA   # a single frequency (1.0) does not depend on the base
    angle = math.atan2(float(imag[1, 1]), float(real[1, 1]))
    theta = float(f"{angle ** (-head_dim / 2):.6g}") if angle > 0 else _ROPE_THETA
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(real.shape[0], dtype=np.float64), inv_freq)
    err = max(np.abs(np.cos(angles) - real).max(), np.abs(np.sin(angles) - imag).max())
    if err > 1e-3:
        log.warning("the rotary table stored in the checkpoint matches no rope theta (off by %.2g); "
                    "using llama2.c's %g", err, _ROPE_THETA)
        return _ROPE_THETA
    if theta != _ROPE_THETA:
        log.warning("the checkpoint's rotary table was made with rope theta %g (llama2.c uses %g); keeping %g",
                    theta, _ROPE_THETA, theta)
    return theta


def _rotary_to_hf(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k projection rows from llama2.c's interleaved rotary pairs to HF's half split."""
    rows, cols = w.shape
    head_dim = rows // heads
    return w.reshape(heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _state_dict(header: Header, t: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    import torch

    def tensor(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    sd = {"model.embed_tokens.weight": tensor(t["embed"][0]), "model.norm.weight": tensor(t["final_norm"][0]),
          "lm_head.weight": tensor(t["embed"][0] if header.shared_classifier else t["wcls"][0])}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tensor(t["attn_norm"][i])
        sd[p + "self_attn.q_proj.weight"] = tensor(_rotary_to_hf(t["wq"][i], header.n_heads))
        sd[p + "self_attn.k_proj.weight"] = tensor(_rotary_to_hf(t["wk"][i], header.n_kv_heads))
        sd[p + "self_attn.v_proj.weight"] = tensor(t["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = tensor(t["wo"][i])
        sd[p + "post_attention_layernorm.weight"] = tensor(t["ffn_norm"][i])
        sd[p + "mlp.gate_proj.weight"] = tensor(t["w1"][i])
        sd[p + "mlp.down_proj.weight"] = tensor(t["w2"][i])
        sd[p + "mlp.up_proj.weight"] = tensor(t["w3"][i])
    return sd


# --- tokenizer -------------------------------------------------------------------------------------

def _proto_fields(buf: bytes) -> dict[int, list[Any]]:
    """Decode one protobuf message into {field number: [raw values]} (varints as int, the rest as bytes).

    Enough to read the few SentencePiece model fields that its Python API does not expose (model
    type, normalizer settings, piece types) without requiring the protobuf package.
    """

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = varint(pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


# SentencePiece enum values (sentencepiece_model.proto)
_SPM_BPE = 2
_SPM_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
_SPM_USER_DEFINED = 4
# Strings the converted tokenizer must split exactly like SentencePiece; a mismatch is logged. Not
# included, because they differ by design of the Hugging Face Llama tokenizer: text that starts with
# whitespace (SentencePiece adds its dummy "▁" prefix anyway, HF does not) and literal "<s>"/"</s>"
# (special tokens in HF, plain text in SentencePiece).
_SELF_CHECK = ("Once upon a time, there was a little girl named Lily.", "Hello  world, twice  spaced",
               "trailing  ", "tabs\tand\nnew \n lines", "digits 12345 and émojis 🙂 ½")


def build_tokenizer(tokenizer_model: Path) -> Any:
    """A tokenizers-backed ``LlamaTokenizer`` equivalent to a SentencePiece BPE ``.model`` file."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise SecateurError(_NEED_SENTENCEPIECE) from None
    from transformers import AddedToken, LlamaTokenizer

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    except (RuntimeError, OSError) as exc:
        hint = (" (llama2.c's own tokenizer .bin cannot be converted; pass the .model it was exported from)"
                if tokenizer_model.suffix == ".bin" else "")
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SecateurError(f"'{tokenizer_model}' is not a SentencePiece .model file{hint}: {reason}") from None

    proto = _proto_fields(sp.serialized_model_proto())
    trainer = _proto_fields(proto[2][0]) if 2 in proto else {}
    normalizer = _proto_fields(proto[3][0]) if 3 in proto else {}
    model_type = trainer.get(3, [1])[-1]
    if model_type != _SPM_BPE:
        raise SecateurError(f"'{tokenizer_model}' is a SentencePiece {_SPM_MODEL_TYPES.get(model_type, model_type)} "
                            "model; only BPE tokenizers (what llama2.c trains) can be converted")
    rule = normalizer.get(1, [b"identity"])[-1].decode(errors="replace")
    add_dummy_prefix = bool(normalizer.get(3, [1])[-1])
    if rule != "identity" or normalizer.get(4, [1])[-1]:
        log.warning("'%s' normalizes text (rule %r, remove_extra_whitespaces=%s); the Hugging Face tokenizer "
                    "does not, so the two may differ on unusual whitespace or characters", tokenizer_model, rule,
                    bool(normalizer.get(4, [1])[-1]))
    if not trainer.get(35, [0])[-1]:
        log.warning("'%s' was trained without byte fallback; characters outside its vocabulary may be "
                    "dropped instead of mapped to <unk>", tokenizer_model)

    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != n:
        raise SecateurError(f"'{tokenizer_model}' has duplicate pieces; it cannot be a BPE vocabulary")
    types = [_proto_fields(p).get(3, [1])[-1] for p in proto.get(1, [])]
    # In SentencePiece BPE the id of a normal piece is its merge rank, so a merge's priority is the
    # id of the piece it produces; among several splits of one piece the shorter left part goes first.
    merges = []
    for i, piece in enumerate(pieces):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        merges.extend((i, k, piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in vocab and piece[k:] in vocab)
    merges = [(left, right) for _, _, left, right in sorted(merges)]

    special = {}
    for role, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                      ("pad_token", sp.pad_id())):
        special[role] = pieces[idx] if 0 <= idx < n else None
    controls = [pieces[i] for i in range(n) if sp.is_control(i)]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=None if add_dummy_prefix else False,
                               legacy=False, add_bos_token=True, add_eos_token=False,
                               extra_special_tokens=controls, **special)
    user_defined = [pieces[i] for i, kind in enumerate(types) if kind == _SPM_USER_DEFINED]
    if user_defined:   # SentencePiece matches these whole, before BPE
        tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in user_defined])

    for text in _SELF_CHECK:
        if tokenizer(text, add_special_tokens=False).input_ids != sp.encode(text):
            log.warning("the converted tokenizer splits %r differently from SentencePiece", text)
    return tokenizer


# --- the importer ----------------------------------------------------------------------------------

def _check_target(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SecateurError(f"output path '{out_dir}' is a file; expected a new or empty directory")
        if any(out_dir.iterdir()):
            raise SecateurError(f"output directory '{out_dir}' is not empty; choose a new path or empty it first")


def import_llama2c(model_bin: str | os.PathLike, tokenizer_model: str | os.PathLike,
                   out_dir: str | os.PathLike) -> Path:
    """Convert a llama2.c checkpoint and its SentencePiece tokenizer into a Hugging Face Llama directory.

    ``model_bin`` is a llama2.c export (version 0, 1 or 2), ``tokenizer_model`` the SentencePiece
    ``.model`` it was trained with, ``out_dir`` a new (or empty) directory. Returns ``out_dir``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_bin, tokenizer_model, out_dir = Path(model_bin), Path(tokenizer_model), Path(out_dir)
    for path, what in ((model_bin, "llama2.c checkpoint"), (tokenizer_model, "tokenizer model")):
        if not path.exists():
            raise SecateurError(f"{what} '{path}' does not exist")
        if not path.is_file():
            raise SecateurError(f"{what} '{path}' is not a file")
    _check_target(out_dir)

    header = read_header(model_bin)
    size, expected = model_bin.stat().st_size, header.expected_bytes()
    if size != expected:
        state = "truncated" if size < expected else "has trailing data"
        raise SecateurError(f"'{model_bin}' is {size} bytes but its header ({header.describe()}) implies "
                            f"{expected} bytes; the file is {state} or not a llama2.c checkpoint")
    log.info("importing llama2.c checkpoint %s (%s)", model_bin, header.describe())

    tokenizer = build_tokenizer(tokenizer_model)
    if len(tokenizer) != header.vocab_size:
        raise SecateurError(f"tokenizer '{tokenizer_model}' has {len(tokenizer)} tokens but checkpoint "
                            f"'{model_bin}' has a vocabulary of {header.vocab_size}; they do not belong together")

    tensors = _read_tensors(model_bin, header)
    theta = (_rope_theta(tensors["freq_real"][0], tensors["freq_imag"][0], header.head_dim)
             if header.version == 0 else _ROPE_THETA)
    config = LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, head_dim=header.head_dim, hidden_act="silu",
        max_position_embeddings=header.max_seq_len, rms_norm_eps=_RMS_NORM_EPS, rope_theta=theta,
        tie_word_embeddings=header.shared_classifier, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    sd = _state_dict(header, tensors)
    del tensors
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    if header.shared_classifier:
        model.tie_weights()
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pickled = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if pickled or not list(tmp.glob("*.safetensors")):
            raise SecateurError(f"saving wrote {pickled or 'no safetensors weights'}; "
                                "this transformers version does not save safetensors by default")
        _check_target(out_dir)   # refuse, rather than clobber, anything that appeared meanwhile
        if out_dir.exists():
            out_dir.rmdir()      # empty: make room for the rename
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out_dir)
    return out_dir


__all__ = ["import_llama2c", "read_header", "build_tokenizer", "Header", "MAGIC"]
