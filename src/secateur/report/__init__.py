"""The report room: one self-contained HTML page that shows a family of variants at a glance.

    from secateur import report
    report.write(family, "report.html")        # atomic; report.render(family) gives the text
    layers = report.layer_stats("runs/stories/student-sparse")   # per-layer sparsity and bits

The page (see ``docs/report.md``) holds a header (family, base, machine), a summary table, the
Pareto plots (quality vs measured latency, quality vs bytes; the front of admitted models drawn
through), the search's predicted and confirmed points (when the family came from ``secateur search``),
the exit curves of variants with exit heads (the quality change their ``early_exit`` step priced
against the mean blocks computed and against the speed-up the speed evaluation measured, beside
the static variants), the lineage graph, per-layer sparsity and bit-width heatmaps, the latency distributions
(p50/p95/p99), the gate verdicts and the compression cards side by side. It is inline CSS and
inline SVG drawn by this room's own code: no script, no CDN, no font, nothing fetched (a
Content-Security-Policy of ``default-src 'none'`` says so to the browser). Every string from the
family is escaped.

The input is a plain, JSON-able dict; only ``variants`` (and each one's ``name``) is required and
every other piece may be missing (its section then says "no data")::

    {"family": str,                                   # the family's name
     "created": str,                                  # optional: shown in the header
     "machine": {"cpu": str, "threads": int, ...},    # further scalar keys are shown too
     "base": {... the fields of a variant; name "base" unless given, status "base" ...},
     "variants": [{
        "name": str,                                  # unique within the family
        "id": str | None,                             # the registry's variant id
        "parent": str,                                # "base" (the base, whatever its name) or a variant's name
        "status": "admitted" | "rejected",
        "aliases": [str],                             # without the family@ prefix
        "recipe": {"steps": [{"method": str, ...}]},  # default: the card's recipe
        "card": {...},                                # compression.json (artifacts.card.build_card + files)
        "evaluations": [{"task": str, "metric": str, "value": float, "protocol": str | None,
                         "spec": {...}, "settings": {"data": ..., ...}}],
        "speed": {"prefill_ms_median"|"_p95"|"_p99": float,          # causal LMs
                  "decode_step_ms_median"|"_p95"|"_p99": float, "decode_tokens_per_s": float,
                  "latency_ms_median"|"_p95"|"_p99": float,          # encoders
                  "peak_rss_mib": float, "settings": {...},
                  "exit_curve": [{"threshold": float, "speedup": float, ...}]} | None,  # causal exit models
        "verdicts": [{"gate": str, "kind": "quality"|"speed"|"max_bytes"|"max_peak_rss",
                      "passed": bool, "value": number, "limit": number, "unit": str, ...}],
        "bytes": int,                                 # weights on disk (default: the card's safetensors)
        "layers": {"sparsity": {layer: float}, "bits": {layer: int}},   # layer_stats(artifact_dir)
     }, ...],
     "search": [{"id": str, "label": str, "run_id": str, "front": bool,     # optional: a search's points
                 "proxies": {"speedup": float, "loss_delta": float, ...},
                 "measured": {"quality_drop": float, "speedup": float, ...} | None,
                 "confirmed": {"speedup": float, ...} | None}]}

A quality number is an evaluation whose task is not ``speed``; evaluations with the same task,
metric, protocol and data (``settings.data``, else ``spec.data``) are one quality axis. Perplexity
(and losses, error rates) are lower-is-better, STS and the rest higher-is-better. The latency
axis is the first of ``latency_ms``, ``decode_step_ms``, ``prefill_ms`` that any model has.

This room reads only that dict, except :func:`layer_stats`, which reads an artifact's safetensors
(``safe_open``, never unpickling) and card to fill ``layers``.
"""

from __future__ import annotations

from .family import collect
from .layers import layer_stats
from .page import higher_is_better, pareto_front, render, write

__all__ = ["render", "write", "layer_stats", "pareto_front", "higher_is_better", "collect"]
