"""GGUF export for llama.cpp: ``secateur export ARTIFACT OUT.gguf --format gguf --type q8_0``.

Llama-family causal LMs (model types ``llama`` and ``mistral``) in F32, F16, Q8_0 or Q4_0 (with
the ``gguf`` package, extra ``gguf``). What is written:

* **metadata**: the architecture (``llama``), context length, widths, blocks, heads and KV heads,
  head dimension, RMS-norm epsilon, RoPE base; the tokenizer as llama.cpp's SentencePiece model
  (``llama``): the vocabulary in id order, each token's type (control, byte ``<0xNN>``, unknown,
  normal) and a score that makes llama.cpp's highest-score-first bigram merging follow the
  tokenizer's BPE merge order (a token made by merge ``r`` scores ``-r``);
* **tensors** under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` …, ``output_norm``,
  ``output`` unless tied). The query and key projections are permuted from Hugging Face's rotary
  layout (first half / second half of each head) to llama.cpp's interleaved pairs.
* **quantization**: Q8_0 and Q4_0 store blocks of 32 weights along a row with one float16 scale
  (Q4_0 as ``q + 8`` in a nibble). A secateur QuantLinear whose scheme is exactly that —
  symmetric, 8 (Q8_0) or 4 (Q4_0) bits, groups of 32 — is **carried over**: our integers are
  written as they are, the scales rounded to float16. Any other weight is **requantized** from its
  float (dequantized) value by gguf's reference quantizer, and a row whose length is not a multiple
  of 32 (stories260K's 172-wide MLP) stays float16. Norms stay float32. The record beside the file
  (``OUT.gguf.json``) lists each tensor's type and which of these happened.

The file is written under a temporary name, fsynced and renamed: a killed export leaves nothing
that looks finished. Verified by running it in llama.cpp (``llama-cpp-python``): logits on a fixed
prompt and P1 perplexity against secateur's (``tests/artifacts/test_gguf.py``,
``benchmarks/gguf_export.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SecateurError, one_of

TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCHITECTURES = ("llama", "mistral")
BLOCK = 32


def _names(i: int) -> dict[str, str]:
    return {f"model.layers.{i}.input_layernorm.weight": f"blk.{i}.attn_norm.weight",
            f"model.layers.{i}.self_attn.q_proj": f"blk.{i}.attn_q.weight",
            f"model.layers.{i}.self_attn.k_proj": f"blk.{i}.attn_k.weight",
            f"model.layers.{i}.self_attn.v_proj": f"blk.{i}.attn_v.weight",
            f"model.layers.{i}.self_attn.o_proj": f"blk.{i}.attn_output.weight",
            f"model.layers.{i}.post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
            f"model.layers.{i}.mlp.gate_proj": f"blk.{i}.ffn_gate.weight",
            f"model.layers.{i}.mlp.up_proj": f"blk.{i}.ffn_up.weight",
            f"model.layers.{i}.mlp.down_proj": f"blk.{i}.ffn_down.weight"}


def rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's rotary layout (per head: all first-half
    dimensions, then all second-half ones) to llama.cpp's (per head: dimension pairs interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(writer: Any, tokenizer: Any) -> dict[str, Any]:
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if data is None or data.get("model", {}).get("type") != "BPE" or not data["model"].get("byte_fallback"):
        raise SecateurError("gguf export writes SentencePiece-style tokenizers (BPE with byte fallback, as Llama's); "
                            "this tokenizer is not one")
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = data["model"].get("merges") or []
    rank = {}
    for r, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    types, scores = [], []
    for piece in tokens:
        if piece == tokenizer.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
        elif piece in special:
            types.append(gguf.TokenType.CONTROL)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(rank[piece]) if piece in rank else 0.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(True)
    return {"tokens": len(tokens), "merges": len(merges)}


def _pack_q8_0(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Rows of int8 ``q [rows, cols]`` with one scale per 32 values ``[rows, cols/32]`` -> Q8_0 bytes."""
    rows, cols = q.shape
    blocks = np.zeros((rows, cols // BLOCK), dtype=[("d", "<f2"), ("qs", "i1", (BLOCK,))])
    blocks["d"] = scale.astype(np.float16)
    blocks["qs"] = q.reshape(rows, cols // BLOCK, BLOCK)
    return blocks.view(np.uint8).reshape(rows, -1)


def _pack_q4_0(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int4 values in [-8, 7] -> Q4_0 bytes (``q + 8`` in nibbles: value j low, value j + 16 high)."""
    rows, cols = q.shape
    u = (q.reshape(rows, cols // BLOCK, BLOCK).astype(np.int16) + 8).astype(np.uint8)
    blocks = np.zeros((rows, cols // BLOCK), dtype=[("d", "<f2"), ("qs", "u1", (BLOCK // 2,))])
    blocks["d"] = scale.astype(np.float16)
    blocks["qs"] = u[..., : BLOCK // 2] | (u[..., BLOCK // 2:] << 4)
    return blocks.view(np.uint8).reshape(rows, -1)


def _carried(module: Any, kind: str, permute_heads: int = 0) -> np.ndarray | None:
    """Our integers in the GGUF block type, when the QuantLinear's scheme is exactly it (a q/k
    projection's rows permuted to llama.cpp's rotary layout, with their scales: groups run along a
    row, so a row permutation keeps every group whole)."""
    bits = {"q8_0": 8, "q4_0": 4}.get(kind)
    if bits is None or getattr(module, "bits", None) != bits or getattr(module, "group_size", None) != BLOCK:
        return None
    if getattr(module, "activation", None) or bool(module.weight_zero_point.ne(0).any()):
        return None   # W8A8 activations or asymmetric zero points: not representable
    q = module.weight_q.numpy()
    if int(q.min()) < -(1 << (bits - 1)) or int(q.max()) >= 1 << (bits - 1):
        return None
    scale = module.weight_scale.float().numpy()
    if permute_heads:
        q, scale = rotary_permute(q, permute_heads), rotary_permute(scale, permute_heads)
    return (_pack_q8_0 if bits == 8 else _pack_q4_0)(q, scale)


def export_gguf(artifact: str | os.PathLike, out: str | os.PathLike, kind: str = "f16") -> Path:
    """Write the Llama-family model at ``artifact`` (a secateur artifact or model directory) as a GGUF
    file at ``out``; see the module docstring. Returns the path."""
    try:
        import gguf
    except ImportError:
        raise SecateurError("gguf export needs the gguf package: pip install 'secateur[gguf]'") from None
    from .checkpoint import load

    if kind not in TYPES:
        raise SecateurError(f"unknown GGUF type '{kind}'; valid types: {one_of(TYPES)}")
    loaded = load(artifact)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.model.config
    if config.model_type not in ARCHITECTURES:
        raise SecateurError(f"gguf export writes Llama-family models ({', '.join(ARCHITECTURES)}); "
                            f"'{artifact}' is a {config.model_type}")
    if tokenizer is None:
        raise SecateurError(f"'{artifact}' has no tokenizer; a GGUF file carries one")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(Path(str(artifact)).name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    record: dict[str, Any] = {"source": str(artifact), "weights_sha256": loaded.info.get("weights_sha256"),
                              "type": kind, "tokenizer": _tokenizer(writer, tokenizer), "tensors": {}}

    # a secateur-quantized variant is exported as it is: its integers carried where the type allows,
    # what it keeps in float (embeddings, a tied head) in float16, not requantized to the file's type
    variant_quantized = any(hasattr(m, "dequantized_weight") for m in model.modules())

    def put(name: str, value: np.ndarray, how: str, raw: Any = None, shape: Any = None) -> None:
        if raw is None:
            writer.add_tensor(name, value)
            record["tensors"][name] = {"type": str(value.dtype), "how": how}
        else:
            writer.add_tensor(name, value, raw_dtype=raw)  # the shape is read from the bytes per row
            record["tensors"][name] = {"type": raw.name, "how": how}

    def matrix(name: str, module_or_weight: Any, permute_heads: int = 0) -> None:
        module = module_or_weight if isinstance(module_or_weight, torch.nn.Module) else None
        weight = module.dequantized_weight() if hasattr(module, "dequantized_weight") else \
            (module.weight if module is not None else module_or_weight)
        w = weight.detach().float().numpy()
        if permute_heads:
            w = rotary_permute(w, permute_heads)
        if kind == "f32":
            return put(name, w, "float32")
        if kind == "f16" or w.shape[1] % BLOCK:
            return put(name, w.astype(np.float16), "float16" if kind == "f16" else
                       f"float16 (rows of {w.shape[1]} are not a multiple of {BLOCK})")
        if variant_quantized and not hasattr(module, "dequantized_weight"):  # the variant keeps it in float
            return put(name, w.astype(np.float16), "float16 (float in the secateur variant)")
        carried = None if module is None else _carried(module, kind, permute_heads)
        if carried is not None:
            return put(name, carried, "carried (our integers; scales as float16)", qtype, w.shape)
        put(name, gguf.quants.quantize(w, qtype), "requantized from float weights", qtype, w.shape)

    matrix("token_embd.weight", model.model.embed_tokens.weight)
    for i in range(config.num_hidden_layers):
        for source, target in _names(i).items():
            if source.endswith(".weight"):  # a norm
                put(target, model.get_parameter(source).detach().float().numpy(), "float32")
            else:
                module = model.get_submodule(source)
                permute = heads if source.endswith("q_proj") else kv_heads if source.endswith("k_proj") else 0
                matrix(target, module, permute)
    put("output_norm.weight", model.model.norm.weight.detach().float().numpy(), "float32")
    if not getattr(config, "tie_word_embeddings", False):
        matrix("output.weight", model.lm_head)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    side = out.with_name(out.name + ".json")
    side.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return out


__all__ = ["export_gguf", "rotary_permute", "TYPES"]
