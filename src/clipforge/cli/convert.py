"""``clipforge convert SRC DST --to FORMAT``: convert a checkpoint between formats."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between clipforge, OpenAI, OpenCLIP and HF formats",
                       description="Reads any supported checkpoint (format detected) and writes it in another "
                                   "format. clipforge: DST ending in .safetensors (single file) or a folder; "
                                   "openai/openclip: a .pt state dict (+ open_clip_config.json beside it); "
                                   "hf: a transformers CLIPModel folder.")
    p.add_argument("src", help="checkpoint file or folder")
    p.add_argument("dst", help="output file or folder")
    p.add_argument("--to", required=True, choices=["clipforge", "openai", "openclip", "hf"])
    p.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                   help="override/declare the activation when SRC does not record it (bare state dicts)")
    p.add_argument("--config", default=None, help="config for SRC: a JSON file or a zoo name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import convert, load_model

    out = convert(args.src, args.dst, args.to, activation=args.activation, config=args.config)
    model = load_model(out) if args.to != "openai" else None
    name = model.config.name if model is not None else ""
    print(f"wrote {args.to} checkpoint: {out}" + (f" ({name})" if name else ""))
    return 0
