"""Running secateur's ONNX exports in ONNX Runtime: a session, sentence embeddings, greedy decoding.

The exports (:mod:`secateur.artifacts.onnx`) take plain integer tensors and return plain float
arrays, so running them needs nothing of secateur; these helpers only spare a user (and the tests
and benchmarks) the bookkeeping:

* :func:`session` opens an export on the CPU. It sets ONNX Runtime's
  ``session.qdq_matmulnbits_accuracy_level`` to 0: ONNX Runtime fuses a weight-only
  ``DequantizeLinear -> MatMul`` into ``MatMulNBits``, and at its default accuracy level it would
  also round the *activations* to int8 — a W4A16 model would silently run as W4A8. Level 0 keeps
  float activations, the scheme the secateur variant has.
* :func:`embed` runs an encoder export on a padded batch (``token_type_ids`` filled with zeros
  when the graph takes them and the caller has none).
* :func:`greedy_decode` runs a causal-LM export token by token through its KV cache
  (``past_key_values.{i}.key/value`` in, ``present.{i}.key/value`` out): one prefill call over the
  prompt, then one call per new token with the previous call's ``present`` as the next ``past``.

``onnxruntime`` (extra ``onnx``) is imported only when one of these is called.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import SecateurError

INSTALL_HINT = "pip install 'secateur[onnx]'"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise SecateurError(f"running an ONNX export needs onnxruntime; {INSTALL_HINT}") from None
    return onnxruntime


def session(path: Any, threads: int | None = None, *, optimize: bool = True) -> Any:
    """An ONNX Runtime CPU session on the export at ``path`` (the ``.onnx`` file or its folder),
    weight-only quantized MatMuls kept on float activations (see the module docstring)."""
    from pathlib import Path

    ort = _ort()
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise SecateurError(f"no ONNX model at '{path}'; export one with `secateur export ARTIFACT OUT --format onnx`")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _names(sess: Any) -> list[str]:
    return [i.name for i in sess.get_inputs()]


def embed(sess: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> dict[str, np.ndarray]:
    """``{"last_hidden_state", "sentence_embedding"}`` of an encoder export for one padded batch
    (``[batch, seq]`` integer arrays)."""
    feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
    if "token_type_ids" in _names(sess):
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"]) if token_type_ids is None \
            else np.asarray(token_type_ids, dtype=np.int64)
    outputs = [o.name for o in sess.get_outputs()]
    return dict(zip(outputs, sess.run(outputs, feed)))


def empty_cache(sess: Any, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length ``past_key_values.{i}.key/value`` arrays for ``batch`` sequences (the first call)."""
    cache = {}
    for spec in sess.get_inputs():
        if spec.name.startswith("past_key_values."):
            heads, head_dim = spec.shape[1], spec.shape[3]
            cache[spec.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return cache


def step(sess: Any, input_ids: Any, cache: dict[str, np.ndarray], attention_mask: Any = None,
         position_ids: Any = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One causal-LM call: ``(logits [batch, seq, vocab], the cache to pass next)``. Without a mask
    every past and new token is attended; without positions they continue the cache."""
    ids = np.asarray(input_ids, dtype=np.int64)
    batch, seq = ids.shape
    past = next(iter(cache.values())).shape[2] if cache else 0
    if attention_mask is None:
        attention_mask = np.ones((batch, past + seq), dtype=np.int64)
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq))
    feed = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64), **cache}
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, feed)))
    present = {name.replace("present.", "past_key_values.", 1): v for name, v in values.items()
               if name.startswith("present.")}
    return values["logits"], present


def greedy_decode(sess: Any, prompt: Sequence[int], new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding of one sequence with the KV cache: the ``new_tokens`` (or fewer, up to and
    including ``eos_token_id``) tokens that follow ``prompt``."""
    if not prompt or new_tokens < 1:
        raise SecateurError(f"greedy_decode needs a non-empty prompt and new_tokens >= 1 "
                            f"(got {len(prompt)} prompt tokens, new_tokens={new_tokens})")
    logits, cache = step(sess, np.asarray([list(prompt)]), empty_cache(sess))
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(np.argmax(logits[0, -1]))
        out.append(token)
        if token == eos_token_id or len(out) == new_tokens:
            break
        logits, cache = step(sess, np.asarray([[token]]), cache)
    return out


__all__ = ["session", "embed", "empty_cache", "step", "greedy_decode"]
