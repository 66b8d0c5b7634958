"""Self-contained HTML report of evaluation records, plots inline as base64 PNGs.

Plots are drawn with matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so
building a report touches no global plotting state. Everything is derived from the records
alone, so a report can be rebuilt from saved JSON.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..utils import atomic_write_text
from .records import display_model

PER_CLASS_BARS_MAX = 60


def _figure(w: float = 6.0, h: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def plot_confusion(cm: Sequence[Sequence[int]], classnames: Sequence[str], title: str) -> str:
    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = cm.shape[0]
    size = min(10.0, 3.0 + 0.3 * k)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    if k <= 30:
        ax.set_xticks(range(k), [str(c)[:14] for c in classnames[:k]], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [str(c)[:14] for c in classnames[:k]], fontsize=7)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def plot_per_class(recall: Sequence[float | None], classnames: Sequence[str], title: str) -> str:
    r = np.array([np.nan if v is None else v for v in recall], dtype=np.float64)
    if len(r) > PER_CLASS_BARS_MAX:  # too many bars to read: show the distribution instead
        fig = _figure(6, 3.5)
        ax = fig.add_subplot()
        ax.hist(r[np.isfinite(r)], bins=20, range=(0, 1), color="#4c72b0")
        ax.set_xlabel("per-class accuracy (recall)")
        ax.set_ylabel("classes")
    else:
        fig = _figure(max(6.0, 0.25 * len(r) + 2), 3.5)
        ax = fig.add_subplot()
        ax.bar(range(len(r)), np.nan_to_num(r), color="#4c72b0")
        ax.set_xticks(range(len(r)), [str(c)[:14] for c in classnames[:len(r)]], rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (recall)")
    ax.set_title(title)
    return _png(fig)


def plot_fewshot(curve: dict[str, dict[str, Any]], zeroshot: float | None, matching_k: float | None, title: str) -> str:
    ks = sorted(int(k) for k in curve)
    mean = [curve[str(k)]["mean"] for k in ks]
    std = [curve[str(k)]["std"] for k in ks]
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label="few-shot linear probe (mean ± std)")
    if zeroshot is not None:
        ax.axhline(zeroshot, color="#c44e52", linestyle="--", label=f"zero-shot ({zeroshot:.3f})")
        if matching_k is not None:
            ax.axvline(matching_k, color="#c44e52", linestyle=":", alpha=0.6)
            ax.annotate(f"matches zero-shot at k≈{matching_k:.2g}", (matching_k, zeroshot),
                        textcoords="offset points", xytext=(5, -15), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def plot_robustness(rows: Sequence[dict[str, Any]], title: str) -> str:
    labels = [r["shift"] for r in rows]
    x = np.arange(len(rows))
    has_lp = any(r.get("linear_probe_acc1") is not None for r in rows)
    w = 0.4 if has_lp else 0.6
    fig = _figure(max(6.0, 0.8 * len(rows) + 2), 4)
    ax = fig.add_subplot()
    ax.bar(x - (w / 2 if has_lp else 0), [r.get("zeroshot_acc1") or 0 for r in rows], w, label="zero-shot")
    if has_lp:
        ax.bar(x + w / 2, [r.get("linear_probe_acc1") or 0 for r in rows], w, label="linear probe (fit on clean)")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def plot_bars(values: dict[str, float], title: str, ylabel: str) -> str:
    fig = _figure(max(5.0, 0.7 * len(values) + 2), 3.5)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), [v if v is not None else 0 for v in values.values()], color="#55a868")
    ax.set_xticks(range(len(values)), list(values), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig)


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in metrics.items())
    return f"<table class='m'><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else "-"
    return "-" if v is None else html.escape(str(v))


def record_plots(rec: dict[str, Any]) -> list[str]:
    """The plots that fit one record's task."""
    task, ds = rec["task"], rec["dataset"]
    out: list[str] = []
    names = rec.get("classnames") or []
    if task in ("zeroshot_classification", "linear_probe"):
        if rec.get("confusion_matrix") is not None:
            out.append(plot_confusion(rec["confusion_matrix"], names, f"{ds}: confusion matrix ({task})"))
        if rec.get("per_class_recall") is not None:
            out.append(plot_per_class(rec["per_class_recall"], names, f"{ds}: per-class accuracy ({task})"))
        if rec.get("templates_source"):
            out.append(f"<p>templates: {html.escape(str(rec.get('templates_set')))} "
                       f"({len(rec.get('templates') or [])}), {html.escape(str(rec['templates_source']))}</p>")
        if rec.get("prompt_comparison"):
            out.append(plot_bars({k: v["acc1"] for k, v in rec["prompt_comparison"].items()},
                                 f"{ds}: prompt ensembling", "top-1 accuracy"))
    elif task == "fewshot" and rec.get("curve"):
        out.append(plot_fewshot(rec["curve"], rec["metrics"].get("zeroshot_acc1"),
                                rec["metrics"].get("shots_to_match_zeroshot"), f"{ds}: few-shot vs zero-shot"))
    elif task == "robustness" and rec.get("shifts"):
        out.append(plot_robustness(rec["shifts"], f"{ds}: accuracy under distribution shift"))
    elif task == "zeroshot_retrieval":
        out.append(plot_bars({k.replace("_retrieval_recall", ""): v for k, v in rec["metrics"].items() if "recall@" in k},
                             f"{ds}: retrieval recall", "recall"))
    return out


def build_report(records: Iterable[dict[str, Any]], path: str | Path, title: str = "clipforge evaluation") -> Path:
    """Write ``path`` (HTML): a summary table, then each record's metrics and plots."""
    records = list(records)
    summary = "".join(
        f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(str(r['dataset']))}</td>"
        f"<td>{html.escape(display_model(r))}</td><td>{_headline(r)}</td></tr>" for r in records)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%;margin:6px}"
             "section{border-top:2px solid #888;margin-top:2em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<table><tr><th>task</th><th>dataset</th><th>model</th><th>headline</th></tr>{summary}</table>"]
    for i, r in enumerate(records):
        parts.append(f"<section id='r{i}'><h2>{html.escape(r['task'])}: {html.escape(str(r['dataset']))}</h2>"
                     f"<p>model: {html.escape(display_model(r))}</p>")
        parts.append(_metrics_table(r["metrics"]))
        if r.get("matching_note"):
            parts.append(f"<p>shots to match zero-shot: {html.escape(r['matching_note'])}</p>")
        if r.get("skipped"):
            parts.append(f"<p>skipped unreadable items: {int(r['skipped'])}</p>")
        try:
            parts.extend(record_plots(r))
        except Exception as e:  # a plotting failure must not lose the report
            parts.append(f"<p>plot failed: {html.escape(repr(e))}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)


def _headline(r: dict[str, Any]) -> str:
    m = r["metrics"]
    for key in ("acc1", "lp_acc1", "mean_recall", "clean_zeroshot_acc1", "zeroshot_acc1"):
        if key in m:
            return f"{key} = {_fmt(m[key])}"
    return ""
