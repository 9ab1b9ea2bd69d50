"""The pipeline room: run one recipe end to end (``recipe_run.py``), and a family of variants from
a pipeline file, each built from its parent, cached, resumable and admitted by gates
(``spec.py``: the file; ``run.py``: the DAG; ``gates.py``: the measurements and verdicts).

    from secateur.pipeline import Pipeline, run_pipeline
    result = run_pipeline(Pipeline.load("family.yaml"), workdir="runs")
    result.failures          # one line per failed gate, saying by how much
"""

from __future__ import annotations

from .recipe_run import (STORAGE, RunResult, _resume_dir, calibration_data, check_storage, dry_run, evaluate_all,
                         run_recipe)
from .run import PipelineResult, Stage, plan_pipeline, plan_resources, register, run_pipeline, stage_key
from .spec import Gate, Pipeline, Variant

__all__ = ["run_recipe", "dry_run", "calibration_data", "check_storage", "evaluate_all", "RunResult", "STORAGE",
           "Pipeline", "Variant", "Gate", "run_pipeline", "plan_pipeline", "plan_resources", "register", "PipelineResult", "Stage", "stage_key",
           "_resume_dir"]
