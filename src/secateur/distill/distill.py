"""Knowledge distillation — train the model (the student) to imitate a teacher: recovery after
pruning, a smaller student from a subset of layers, a quantized student.

Hinton et al. 2015 (soft targets with a temperature); DistilBERT (Sanh et al. 2019: a student
from every other layer, cosine loss on hidden states); TinyBERT (Jiao et al. 2020: hidden-state
losses through learned projections); MiniLLM (Gu et al. 2024: reverse KL); sequence-level
distillation on teacher-generated text (Kim & Rush 2016).

The student is whatever the recipe has made so far: a pruned model (its zeros stay zero), a
model with whole blocks removed (``structured`` with ``drop_layers``, which picks them by depth
importance), a quantized model (trained through fake quantization from its integers, then packed
again), or a fresh smaller model (:mod:`secateur.distill.students`). The teacher is ``teacher:``
in the step, else compress_'s ``teacher`` argument, else the model as it was before the recipe's
first step. All the optimisation happens in the one loop of :mod:`secateur.distill.train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..api import register
from .run import run_training
from .train import TrainingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig(TrainingConfig):
    """Train the model to imitate a teacher (KL on logits, hidden states, sentence embeddings)."""


# --- the method (the shared training step is run.py) ---------------------------------------------
@register("distill", DistillConfig, kind="distill",
          uses="training text (its data: field) or the recipe's calibration windows",
          trains=True,
          paper="Hinton et al. 2015; DistilBERT arXiv:1910.01108; TinyBERT arXiv:1909.10351")
def apply(model: nn.Module, config: DistillConfig, ctx: Any) -> dict[str, Any]:
    from ..quant.common import replace
    from ..quant.fakequant import FakeQuantLinear, convert_qat
    from ..runtime.linear import QuantLinear

    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in quantized:  # a quantized student trains through fake quantization from its integers
        replace(model, name, FakeQuantLinear.from_quant_linear(model.get_submodule(name)))
    out = run_training(model, config, ctx)
    if quantized:
        out["quantized_layers"] = convert_qat(model)
    return out
