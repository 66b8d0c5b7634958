"""Building training sets the way the paper built WIT: pool statistics, query lists, query
balancing, CLIP-score filtering, exact and near de-duplication, evaluation-set
decontamination. Every step streams WebDataset shards (or a manifest) in and writes shards
out (original image bytes copied, never re-encoded), resumable per shard, split across
torchrun ranks, with a report of what was kept and dropped and why.

>>> from clipforge.curation import open_pool, run_step, DedupStep
>>> report = run_step(DedupStep(exact="image"), open_pool("pool/{00000..00009}.tar"), "deduped/")
"""

from .balance import BalanceStep, count_summary
from .decontam import DecontamStep, iter_eval_images
from .dedup import DedupStep
from .embed import ClipEmbedder, Embedder, read_embeddings, write_embeddings
from .hashing import caption_hash, pixel_hash
from .matcher import QueryMatcher, read_queries
from .neighbors import range_pairs
from .queries import QueryList, queries_from_corpus, queries_from_vocab
from .records import Pool, Unit, open_pool
from .runner import Decision, Item, RunOptions, Step, StepRun, read_decisions, run_step
from .scoring import FilterStep, ScoreStep, ScoreTable
from .stats import StatsStep
from .text import STOPWORDS, guess_language, normalize_caption, words

__all__ = [
    "open_pool", "Pool", "Unit", "run_step", "RunOptions", "Step", "StepRun", "Decision", "Item",
    "read_decisions", "StatsStep", "BalanceStep", "ScoreStep", "FilterStep", "ScoreTable", "DedupStep",
    "DecontamStep", "QueryMatcher", "read_queries", "QueryList", "queries_from_vocab", "queries_from_corpus",
    "Embedder", "ClipEmbedder", "read_embeddings", "write_embeddings", "pixel_hash", "caption_hash",
    "normalize_caption", "words", "guess_language", "STOPWORDS", "range_pairs", "count_summary", "iter_eval_images",
]
