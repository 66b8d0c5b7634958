"""The demo's HTML report: a results table and example retrievals with the images inline
(base64 PNG), so the page is one self-contained file that opens anywhere."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..utils import atomic_write_text


def png_data_uri(image: Image.Image | torch.Tensor, scale: int = 2) -> str:
    """A PIL image (or a ``[3,H,W]`` uint8/0-1 float tensor) as a ``data:image/png;base64`` URI,
    enlarged ``scale`` times with nearest-neighbour so small scenes stay crisp."""
    if isinstance(image, torch.Tensor):
        x = image.detach().cpu()
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round()
        image = Image.fromarray(x.to(torch.uint8).permute(1, 2, 0).numpy())
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.q{margin:1.2em 0}.q img{margin:2px;border:3px solid transparent}
.q img.hit{border-color:#2a2}.cap{font-size:.9em}.cap.hit{color:#161;font-weight:600}.muted{color:#777}
.row{display:flex;gap:1em;align-items:flex-start;margin:.8em 0}
"""


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>'
                                   for i, h in enumerate(header)) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = f"{v:.3f}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="{"l" if i == 0 else ""}">{html.escape(text)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def write_report(path: str | Path, *, title: str, summary_lines: Sequence[str],
                 zeroshot_rows: Sequence[Sequence[Any]], retrieval_rows: Sequence[Sequence[Any]],
                 text_queries: Sequence[dict[str, Any]], image_queries: Sequence[dict[str, Any]],
                 curves_png: str | Path | None = None, selection_rows: Sequence[Sequence[Any]] = ()) -> Path:
    """``text_queries``: ``{"text", "images": [PIL...], "hits": [bool...]}`` (top-k retrieved);
    ``image_queries``: ``{"image": PIL, "captions": [str...], "hits": [bool...], "truth": [str...]}``."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines) + "</ul>")
    parts.append("<h2>Zero-shot classification (held-out scenes)</h2>")
    parts.append(_table(zeroshot_rows, ["task", "classes", "accuracy", "chance", "x chance"]))
    parts.append("<h2>Retrieval (held-out scenes)</h2>")
    parts.append(_table(retrieval_rows, ["direction", "R@1", "R@5", "chance R@1", "chance R@5"]))
    if selection_rows:
        parts.append("<h2>Image-caption selection (minimal pairs of held-out scenes)</h2>"
                     "<p class='muted'>Winoground-style groups of 2 scenes x 2 captions; chance: text and image "
                     "1/4, group 1/6</p>")
        parts.append(_table(selection_rows, ["negative type", "pairs", "text", "image", "group"]))
    if curves_png and Path(curves_png).is_file():
        uri = png_data_uri(Image.open(curves_png), scale=1)
        parts.append(f"<h2>Training curves</h2><img src='{uri}' style='max-width:100%'>")
    parts.append("<h2>Text &rarr; image: top-5 retrieved scenes</h2>"
                 "<p class='muted'>green border: a scene the query was written for</p>")
    for q in text_queries:
        imgs = "".join(f"<img class='{'hit' if h else ''}' src='{png_data_uri(im)}' title='rank {i + 1}'>"
                       for i, (im, h) in enumerate(zip(q["images"], q["hits"])))
        parts.append(f"<div class='q'><div><b>&ldquo;{html.escape(q['text'])}&rdquo;</b></div>{imgs}</div>")
    parts.append("<h2>Image &rarr; text: top captions</h2><p class='muted'>bold green: a true caption of the image</p>")
    for q in image_queries:
        caps = "".join(f"<div class='cap {'hit' if h else ''}'>{i + 1}. {html.escape(c)}</div>"
                       for i, (c, h) in enumerate(zip(q["captions"], q["hits"])))
        truth = html.escape(" / ".join(q.get("truth", [])))
        parts.append(f"<div class='row'><img src='{png_data_uri(q['image'])}'><div>{caps}"
                     f"<div class='cap muted'>true: {truth}</div></div></div>")
    parts.append("</body></html>")
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path


__all__ = ["write_report", "png_data_uri"]
