"""``clipforge demo``: train a tiny CLIP on the built-in captioned scenes within a wall-time budget
on a CPU (``clipforge.training``), then measure what it learned on scenes it never saw
(``clipforge.eval``) and write a report folder.

Modules: ``run`` (settings, the run, the measurements), ``budget`` (thread counts to try, steps
that fit the budget), ``report`` (the self-contained HTML page).
"""

from __future__ import annotations

from .budget import plan_steps, thread_candidates
from .run import (EVAL_SEED, DemoSettings, chance_recall, format_table, retrieval_results, run_demo, scenes_spec,
                  selection_results, train_config, zeroshot_results)

__all__ = ["selection_results", "DemoSettings", "run_demo", "train_config", "scenes_spec", "EVAL_SEED", "zeroshot_results", "retrieval_results", "format_table", "chance_recall",
           "plan_steps", "thread_candidates"]
