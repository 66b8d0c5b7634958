"""The WiSE-FT sweep as a table, a plot and a short HTML page.

The plot is the paper's figure: in-distribution accuracy (x) against accuracy under the shifts
(y), one point per alpha, the zero-shot (alpha = 0) and fine-tuned (alpha = 1) endpoints labelled;
a second panel shows each accuracy against alpha.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

from ..eval import format_table
from ..utils import atomic_open, atomic_write_text


def curve_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per alpha: clean accuracy, mean shifted accuracy, then each shift's accuracy."""
    rows = []
    for r in sorted(records, key=lambda r: r["alpha"]):
        m = r["metrics"]
        row: dict[str, Any] = {"alpha": r["alpha"], "clean_acc1": m["acc1"], "mean_shift_acc1": m.get("mean_shift_acc1")}
        for s in r.get("shifts", []):
            if s["shift"] != "clean":
                row[f"{s['shift']}_acc1"] = s["acc1"]
        rows.append(row)
    return rows


def wise_table(records: Sequence[dict[str, Any]]) -> str:
    rows = curve_rows(records)
    if not rows:
        return "(no WiSE-FT records)"
    for row in rows:
        row["model"] = "zero-shot" if row["alpha"] == 0 else ("fine-tuned" if row["alpha"] == 1 else "")
    cols = ["alpha", "model", "clean_acc1", "mean_shift_acc1"] + [k for k in rows[0] if k.endswith("_acc1")
                                                                   and k not in ("clean_acc1", "mean_shift_acc1")]
    return format_table(rows, cols)


def plot_wise(records: Sequence[dict[str, Any]], path: str | Path, title: str = "WiSE-FT") -> Path | None:
    rows = curve_rows(records)
    if not rows or rows[0]["mean_shift_acc1"] is None:
        return None
    from matplotlib.figure import Figure  # heavy optional dependency, loaded only to draw; no pyplot state

    fig = Figure(figsize=(10.5, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    xs = [r["clean_acc1"] for r in rows]
    ys = [r["mean_shift_acc1"] for r in rows]
    ax.plot(xs, ys, "-", color="0.6", lw=1, zorder=1)
    sc = ax.scatter(xs, ys, c=[r["alpha"] for r in rows], cmap="viridis", vmin=0, vmax=1, s=36, zorder=2)
    fig.colorbar(sc, ax=ax, label="alpha")
    for r, x, y in zip(rows, xs, ys):
        if r["alpha"] in (0, 1):
            label = "zero-shot (alpha=0)" if r["alpha"] == 0 else "fine-tuned (alpha=1)"
            ax.annotate(label, (x, y), textcoords="offset points", fontsize=8,
                        xytext=(-6, -12) if r["alpha"] == 1 else (6, 6), ha="right" if r["alpha"] == 1 else "left")
    ax.set_xlabel("in-distribution accuracy (clean test)")
    ax.set_ylabel("accuracy under shift (mean)")
    ax.set_title("one point per alpha")
    ax.grid(alpha=0.3)
    alphas = [r["alpha"] for r in rows]
    ax2.plot(alphas, xs, "-o", ms=3, lw=2, label="clean")
    ax2.plot(alphas, ys, "-o", ms=3, lw=2, label="mean shift")
    for key in [k for k in rows[0] if k.endswith("_acc1") and k not in ("clean_acc1", "mean_shift_acc1")]:
        ax2.plot(alphas, [r.get(key) for r in rows], "-", lw=0.8, alpha=0.7, label=key[:-5])
    ax2.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax2.set_ylabel("top-1 accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def write_html(path: str | Path, title: str, table: str, png: Path | None, notes: Sequence[str] = ()) -> Path:
    """A self-contained page: notes, the table, the plot (embedded)."""
    img = ""
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        img = f'<img alt="WiSE-FT curve" src="data:image/png;base64,{data}" style="max-width:100%">'
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<body style='font-family:sans-serif;max-width:1100px;margin:2em auto'>"
            f"<h1>{html.escape(title)}</h1><ul>{items}</ul>{img}<pre>{html.escape(table)}</pre></body>")
    path = Path(path)
    atomic_write_text(path, page)
    return path


__all__ = ["curve_rows", "wise_table", "plot_wise", "write_html"]
