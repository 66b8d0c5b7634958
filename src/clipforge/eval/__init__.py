"""Zero-shot transfer and the evaluation suite (paper sections 3.1-3.3).

Building blocks (plain tensors/arrays in, numbers out):
  :class:`ZeroShotClassifier` (prompt-ensembled, disk-cached heads), :func:`retrieval_metrics`
  (chunked Recall@K), :func:`fit_logistic_regression` / :func:`linear_probe` (torch L-BFGS),
  :func:`fewshot_curve`, image :mod:`shifts`, :func:`extract_features` (cached fp16 features).
Tasks (dataset spec in, CLIP_benchmark record out): :func:`run_zeroshot`, :func:`run_retrieval`,
  :func:`run_linear_probe`, :func:`run_fewshot`, :func:`run_robustness`, :func:`run_suite`.
"""

from .cache import default_cache_dir, image_tower_fingerprint, text_tower_fingerprint
from .datasets import InMemoryLabelled, resolve_classnames
from .features import FeatureSet, extract_features
from .fewshot import fewshot_curve, matching_shots, sample_kshot
from .linear_probe import LogisticRegression, fit_logistic_regression, linear_probe, search_C, stratified_split
from .metrics import classification_metrics, confusion_matrix, mean_per_class_recall, topk_accuracy
from .prompts import available_prompt_sets, load_classnames, load_templates
from .records import format_table, make_record, records_table
from .retrieval import (PairFeatures, embed_pairs, pair_logits, pair_probabilities, recall_from_similarity,
                        retrieval_metrics, retrieval_ranks)
from .shifts import Shift, available_shifts, parse_shifts
from .suite import run_suite
from .tasks import EvalContext, run_fewshot, run_linear_probe, run_retrieval, run_robustness, run_zeroshot
from .zeroshot import ZeroShotClassifier, build_zeroshot_weights

__all__ = [
    "ZeroShotClassifier", "build_zeroshot_weights", "load_templates", "load_classnames", "available_prompt_sets",
    "retrieval_metrics", "retrieval_ranks", "recall_from_similarity", "embed_pairs", "PairFeatures",
    "pair_logits", "pair_probabilities",
    "fit_logistic_regression", "linear_probe", "search_C", "LogisticRegression", "stratified_split",
    "fewshot_curve", "matching_shots", "sample_kshot", "Shift", "parse_shifts", "available_shifts",
    "extract_features", "FeatureSet", "InMemoryLabelled", "resolve_classnames",
    "topk_accuracy", "classification_metrics", "confusion_matrix", "mean_per_class_recall",
    "make_record", "format_table", "records_table", "EvalContext",
    "run_zeroshot", "run_retrieval", "run_linear_probe", "run_fewshot", "run_robustness", "run_suite",
    "default_cache_dir", "text_tower_fingerprint", "image_tower_fingerprint",
]

