"""``clipforge models``: list the named architectures."""

from __future__ import annotations

import argparse
import json

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named architectures with parameter counts and input sizes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import _load_zoo
    from ..models import CLIP

    rows = []
    for name, cfg in _load_zoo().items():
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = CLIP(cfg)
        n = model.num_parameters()
        rows.append({"name": name, "tower": cfg.vision.kind, "image_size": cfg.vision.image_size,
                     "embed_dim": cfg.embed_dim, "context_length": cfg.text.context_length,
                     "activation": cfg.activation, "params_image_M": round(n["image"] / 1e6, 2),
                     "params_text_M": round(n["text"] / 1e6, 2), "params_total_M": round(n["total"] / 1e6, 2)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'model':<16}{'tower':<8}{'input':>7}{'embed':>7}{'ctx':>5}  {'activation':<11}{'image M':>9}{'text M':>9}{'total M':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<16}{r['tower']:<8}{r['image_size']:>7}{r['embed_dim']:>7}{r['context_length']:>5}  "
              f"{r['activation']:<11}{r['params_image_M']:>9.2f}{r['params_text_M']:>9.2f}{r['params_total_M']:>9.2f}")
    return 0
