"""``clipforge convert SRC DST --to FORMAT``: convert a checkpoint between formats."""

from __future__ import annotations

import argparse

from .options import add_trust_torchscript_option, existing_path, output_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between clipforge, OpenAI, OpenCLIP and HF formats",
                       description="Reads any supported checkpoint (format detected) and writes it in another "
                                   "format, then reads the result back to check it.\n"
                                   "  clipforge: DST ending in .safetensors (single file) or a folder\n"
                                   "  openai:    a .pt state dict (+ clipforge_config.json beside it)\n"
                                   "  openclip:  a folder (DST without a suffix) that open_clip loads with\n"
                                   "             create_model_and_transforms('local-dir:DST'); or one weights file\n"
                                   "             (.safetensors/.pt/.bin) for open_clip's pretrained=FILE\n"
                                   "  hf:        a transformers folder: CLIPModel; SiglipModel for SigLIP and\n"
                                   "             Siglip2Model for SigLIP2 family models (other families: refused)\n"
                                   "  hf-siglip, hf-siglip2: a SigLIP-shaped model as SiglipModel / Siglip2Model")
    p.add_argument("src", type=existing_path, help="checkpoint file or folder")
    p.add_argument("dst", type=output_path, help="output file or folder")
    p.add_argument("--to", required=True, choices=["clipforge", "openai", "openclip", "hf", "hf-siglip", "hf-siglip2"], help="output format")
    p.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                   help="override/declare the activation when SRC does not record it (bare state dicts)")
    p.add_argument("--config", default=None, help="config for SRC: a JSON file or a zoo name")
    add_trust_torchscript_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import convert
    from ..loading import load

    out = convert(args.src, args.dst, args.to, activation=args.activation, config=args.config,
                  trust_torchscript=args.trust_torchscript)
    model, _ = load(out, fast=False)  # read back through the one loader: the result must load
    name = model.config.name
    print(f"wrote {args.to} checkpoint: {out}" + (f" ({name}, {model.config.activation})" if name else ""))
    if args.to == "openclip" and out.is_dir():
        print(f"open_clip: open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0
