"""Pool statistics (``stats``): sample and caption counts, caption lengths, image sizes and
formats, a script-based language guess, and bad samples by reason. Per-shard histograms are
stored in the shard markers and summed at the merge, so ranks and resumed runs combine."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..utils import write_json
from .records import Unit, image_ext
from .runner import Decision, Item, Step, StepRun
from .text import guess_language, words

_HISTS = ("caption_chars", "caption_words", "captions_per_sample", "width", "height", "aspect", "language",
          "image_format", "image_mode")


def hist_summary(hist: dict[str, int]) -> dict[str, Any]:
    """Summary statistics of a numeric histogram ``{value: count}``."""
    if not hist:
        return {"n": 0}
    vals = np.array([float(k) for k in hist], dtype=np.float64)
    cnts = np.array(list(hist.values()), dtype=np.int64)
    o = np.argsort(vals)
    vals, cnts = vals[o], cnts[o]
    cum = np.cumsum(cnts)
    n = int(cum[-1])

    def pct(p: float) -> float:
        return float(vals[np.searchsorted(cum, p / 100 * n, side="left").clip(0, len(vals) - 1)])

    return {"n": n, "mean": round(float((vals * cnts).sum() / n), 3), "min": float(vals[0]), "max": float(vals[-1]),
            "p5": pct(5), "median": pct(50), "p95": pct(95)}


class StatsStep(Step):
    name = "stats"
    writes_shards = False
    batch_size = 256

    def __init__(self, top_n: int = 10) -> None:
        self.top_n = top_n
        self._unit: str | None = None
        self._acc: dict[str, Counter] = {}

    def _reset(self, unit: Unit) -> None:
        self._unit = unit.name
        self._acc = {h: Counter() for h in _HISTS}
        self._acc["sizes"] = Counter()

    def decide(self, run: StepRun, unit: Unit, items: list[Item]) -> list[Decision]:
        if self._unit != unit.name:
            self._reset(unit)
        a = self._acc
        for it in items:
            s = it.sample
            a["captions_per_sample"][len(s.captions)] += 1
            for c in s.captions:
                a["caption_chars"][len(c)] += 1
                a["caption_words"][len(words(c))] += 1
                a["language"][guess_language(c)] += 1
            w, h = s.image.size
            a["width"][w] += 1
            a["height"][h] += 1
            a["aspect"][round(w / max(h, 1), 2)] += 1
            a["sizes"][f"{w}x{h}"] += 1
            a["image_format"][image_ext(it.record.files) or "?"] += 1
            a["image_mode"][s.image.mode] += 1
        return [Decision(True) for _ in items]

    def finish_unit(self, run: StepRun, unit: Unit, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self._unit != unit.name:  # a unit without any good sample
            self._reset(unit)
        acc = {k: {str(v): n for v, n in c.items()} for k, c in self._acc.items()}
        self._unit = None
        return {"histograms": acc}

    def global_outputs(self, run: StepRun) -> list:
        return [run.out / "stats.json"]

    def summarize(self, run: StepRun, report: dict[str, Any]) -> dict[str, Any]:
        total: dict[str, Counter] = {k: Counter() for k in (*_HISTS, "sizes")}
        for _, m in run.markers():
            for k, h in m.get("extra", {}).get("histograms", {}).items():
                total.setdefault(k, Counter()).update({kk: int(v) for kk, v in h.items()})
        n_caps = sum(total["language"].values())
        out = {
            "samples": report["seen"], "good_samples": report["kept"], "bad_samples": report["dropped"],
            "bad_by_reason": report["dropped_by_reason"], "captions": n_caps,
            "caption_chars": hist_summary(total["caption_chars"]), "caption_words": hist_summary(total["caption_words"]),
            "captions_per_sample": hist_summary(total["captions_per_sample"]),
            "width": hist_summary(total["width"]), "height": hist_summary(total["height"]),
            "aspect": hist_summary(total["aspect"]),
            "top_sizes": dict(total["sizes"].most_common(self.top_n)),
            "languages": {k: {"captions": v, "share": round(v / n_caps, 4)} for k, v in total["language"].most_common()},
            "image_formats": dict(total["image_format"].most_common()),
            "image_modes": dict(total["image_mode"].most_common()),
        }
        write_json(run.out / "stats.json", out)
        return out
