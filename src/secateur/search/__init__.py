"""The search room: find the Pareto family of a model automatically.

A search space (``space.py``: choices per axis — structured pruning, sparsity, recovery
training, quantization — and constraints) is priced by cheap proxies (``proxy.py``: per-block
sensitivity for quality, a per-operation cost model measured once per machine for latency, shapes
for bytes); the most promising candidates are built as pipelines and measured (``trial.py``), on
the local machine or as a Ray Tune experiment (:mod:`secateur.distributed`), within a time budget, resumably
(``run.py``); the measured front is registered as a family with aliases.

    from secateur.search import SearchSpace, search
    result = search("models/stories260K/hf", budget="30m")
    result.front, result.aliases          # candidate ids; best / fastest / smallest
"""

from __future__ import annotations

from .run import SearchResult, parse_alias, parse_budget, pareto_front, search, spearman
from .space import Candidate, Constraint, SearchSpace

__all__ = ["search", "SearchResult", "SearchSpace", "Candidate", "Constraint", "parse_budget", "parse_alias",
           "pareto_front", "spearman"]
