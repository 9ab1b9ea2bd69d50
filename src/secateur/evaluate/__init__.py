"""The evaluation room: perplexity (P1/P3), sentence similarity (P2), speed and memory (P4).

    from secateur.evaluate import evaluate, results_table

    model, tokenizer, _ = secateur.load("models/stories260K/hf")
    r = evaluate(model, tokenizer, "perplexity", "tinystories")      # P1: 5.508
    r = evaluate(model, tokenizer, "perplexity", "wikitext2")        # P3
    r = evaluate(minilm, minilm_tokenizer, "sts")                    # P2 on stsb dev: 86.72
    r = evaluate(model, tokenizer, "speed", prompt_len=128)          # P4
    print(r.to_json()); rich.print(results_table([r]))

Every :class:`EvalResult` carries its protocol (or None when the settings deviate from it), the
data description with the file's sha256, a fingerprint of the token ids or texts evaluated, and
the threads, dtype, device and versions that produced it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..errors import SecateurError, did_you_mean, one_of
from .perplexity import perplexity
from .results import EvalResult, environment, format_value, results_table
from .speed import speed
from .sts import sentence_embeddings, sts

TASKS: dict[str, Callable[..., EvalResult]] = {"perplexity": perplexity, "sts": sts, "speed": speed}
DEFAULT_DATA = {"sts": "stsb"}  # perplexity has no default: P1 (tinystories) and P3 (wikitext2) differ


def options_of(task: str) -> tuple[str, ...]:
    """The keyword options a task accepts (for the CLI's help and checks)."""
    params = inspect.signature(TASKS[task]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def evaluate(model: Any, tokenizer: Any, task: str, data: str | None = None, **options: Any) -> EvalResult:
    """Run one evaluation task: ``perplexity`` (data: tinystories = P1, wikitext2 = P3, or a file),
    ``sts`` (data: stsb = P2, or a pairs file) or ``speed`` (no data). Options go to the task's
    function; unknown ones raise a :class:`SecateurError` naming the valid ones."""
    if task not in TASKS:
        raise SecateurError(f"unknown evaluation task '{task}'{did_you_mean(task, TASKS)}; "
                            f"valid tasks: {one_of(TASKS)}")
    valid = options_of(task)
    for name in options:
        if name not in valid:
            raise SecateurError(f"task '{task}' has no option '{name}'{did_you_mean(name, valid)}; "
                                f"valid options: {one_of(valid)}")
    if task == "speed":
        if data is not None:
            raise SecateurError("task 'speed' takes no data (it times seeded random token ids); drop --data")
        return speed(model, tokenizer, **options)
    data = data or DEFAULT_DATA.get(task)
    if data is None:
        raise SecateurError(f"task '{task}' needs data: 'tinystories' (P1), 'wikitext2' (P3), another dataset name "
                            "or a text file path")
    return TASKS[task](model, tokenizer, data, **options)


__all__ = ["evaluate", "EvalResult", "results_table", "perplexity", "sts", "speed", "sentence_embeddings",
           "environment", "format_value", "TASKS", "options_of"]
