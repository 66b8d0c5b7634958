"""The paper's own experiments, re-run at small scale on your machine (``clipforge experiment``):

* :func:`run_objectives` (Figure 2): contrastive vs bag-of-words vs caption prediction trained on
  the same images, zero-shot accuracy vs images seen, and how many more images each needs.
* :func:`run_scaling` (Figure 9): a family of model sizes with one recipe, zero-shot error and
  validation loss vs counted training compute, power-law fits and a held-out-size prediction.

Modules: ``runs`` (one resumable run per folder, a wall-clock budget across runs), ``curves``
(metric vs images, images-to-reach, power-law fits with intervals), ``objectives``, ``scaling``.
Both experiments write ``results.json`` and a PNG into their ``out`` folder and reuse finished runs.
"""

from __future__ import annotations

from .curves import PowerLawFit, Reach, first_reach, fit_power_law, holdout_prediction, read_curve
from .objectives import OBJECTIVES, ObjectivesConfig, format_objectives, run_objectives
from .runs import Budget, train_or_resume
from .scaling import (DEFAULT_SIZES, SCALING_FAMILY, ScalingConfig, family_config, format_scaling, run_scaling,
                      training_flops)

__all__ = ["ObjectivesConfig", "run_objectives", "format_objectives", "OBJECTIVES", "ScalingConfig", "run_scaling",
           "format_scaling", "family_config", "training_flops", "SCALING_FAMILY", "DEFAULT_SIZES", "Budget",
           "train_or_resume", "read_curve", "first_reach", "Reach", "fit_power_law", "PowerLawFit",
           "holdout_prediction"]
