"""QAT — quantization-aware training: the weights train through their own rounding.

Every targeted Linear computes with ``fake_quantize(W)`` (the integers' values, in float) and
gradients pass the rounding straight through (Jacob et al. 2018, arXiv:1712.05877); with
``learn_scales`` the scales train too (LSQ, Esser et al. 2020, arXiv:1902.08153). The loss is
distillation from the full-precision model (the teacher), as in LLM-QAT (Liu et al. 2023,
arXiv:2305.17888). At the end the trained weights are rounded onto their grids and packed exactly
as post-training quantization packs them, so the artifact is the same compressed-tensors
checkpoint. A model already quantized (e.g. by GPTQ) starts from its own integers and scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..api import register
from ..config import param
from ..quant.common import WeightQuantConfig
from .run import run_training
from .train import TrainingConfig


@dataclass(frozen=True)
class QATConfig(WeightQuantConfig, TrainingConfig):
    """Quantize the weights and train through the rounding, distilling from the full-precision model."""

    learn_scales: bool = param(True, "train the quantization scales too (LSQ)")
    lr: float = param(2e-5, "peak learning rate (AdamW); QAT moves weights by less than a grid step",
                      range=(0.0, 10.0))

    def validate(self) -> None:
        WeightQuantConfig.validate(self)
        TrainingConfig.validate(self)


@register("qat", QATConfig, kind="quantize",
          uses="training text (its data: field) or the recipe's calibration windows",
          trains=True, paper="Jacob et al. arXiv:1712.05877; LSQ arXiv:1902.08153; "
          "LLM-QAT arXiv:2305.17888")
def apply(model: nn.Module, config: QATConfig, ctx: Any) -> dict[str, Any]:
    from ..quant.common import summary
    from ..quant.fakequant import convert_qat, prepare_qat

    prepare_qat(model, config, learn_scales=config.learn_scales)
    out = run_training(model, config, ctx)
    out.update(summary(convert_qat(model), config))
    return out
