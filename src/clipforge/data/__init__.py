"""Data: image-text pair sources (manifests, WebDataset shards, built-in scenes), the
deterministic resumable training loader, and labelled datasets for evaluation."""

from .base import PairSource, Sample
from .labelled import LabelledDataset, open_labelled, read_classnames
from .loader import PairLoader, make_pair_loader
from .manifest import ManifestSource
from .scenes import (ALL_COMBOS, HELDOUT_COMBOS, SCENE_TASKS, TRAIN_COMBOS, ClassificationTask, ScenesDataset,
                     scene_retrieval_set, scene_tasks)
from .shards import ShardSource, expand_braces, resolve_shards
from .skip import BadSample, SkipStats
from .sources import open_pairs

__all__ = [
    "Sample", "PairSource", "SkipStats", "BadSample", "open_pairs", "ManifestSource", "ShardSource",
    "expand_braces", "resolve_shards", "make_pair_loader", "PairLoader", "LabelledDataset", "open_labelled",
    "read_classnames", "ScenesDataset", "ClassificationTask", "scene_tasks", "scene_retrieval_set", "SCENE_TASKS",
    "HELDOUT_COMBOS", "TRAIN_COMBOS", "ALL_COMBOS",
]
