"""Robust fine-tuning: adapt a CLIP model to a labelled task without losing its zero-shot robustness.

``finetune(FinetuneConfig(model=CKPT, dataset=D, out=DIR, steps=...)) -> FinetuneResult``:
cross-entropy fine-tuning of the image tower with the head initialised from the zero-shot
classifier (or at zero; optional LP-FT warm start), or the contrastive FLYP recipe; then WiSE-FT
(Wortsman et al. 2022): the weights of the zero-shot and fine-tuned classifiers interpolated at
each alpha, every interpolation written and evaluated on the clean test set and under image
shifts (:mod:`clipforge.eval`'s robustness shifts), as records, a table, a plot and a page.

Modules: ``config`` (FinetuneConfig), ``classifier`` (CLIP + linear head; zero-shot head),
``wise`` (weight interpolation), ``splits`` (train/test data, deterministic batches),
``run`` (the loop, checkpoints, the sweep), ``report`` (table, plot, HTML).
"""

from __future__ import annotations

from .classifier import ImageClassifier, zeroshot_head_weight
from .config import DEFAULT_ALPHAS, FinetuneConfig
from .run import FinetuneResult, alpha_label, evaluate_positions, finetune, initial_model, load_classifier
from .splits import Positions, Splits, open_splits
from .wise import interpolate_state_dicts, wise_ft

__all__ = ["finetune", "initial_model", "FinetuneConfig", "FinetuneResult", "DEFAULT_ALPHAS", "ImageClassifier",
           "zeroshot_head_weight", "wise_ft", "interpolate_state_dicts", "load_classifier", "evaluate_positions",
           "open_splits", "Splits", "Positions", "alpha_label"]
