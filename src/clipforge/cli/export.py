"""``clipforge export``: export both towers of a checkpoint (ONNX)."""

from __future__ import annotations

import argparse

from .options import add_trust_torchscript_option, existing_path, output_dir, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the image and text towers to ONNX",
                       description="Traces both towers on the CPU. Needs the onnx extra: pip install 'clipforge[onnx]'.")
    p.add_argument("model", type=existing_path, help="checkpoint path (any supported format)")
    p.add_argument("out", type=output_dir, help="output folder")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset version")
    p.add_argument("--check", action="store_true", help="run ONNX Runtime on random inputs and compare with torch")
    add_trust_torchscript_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..loading import load
    from ..export import export_onnx

    model, _ = load(args.model, fast=False, trust_torchscript=args.trust_torchscript)
    paths = export_onnx(model, args.out, opset=args.opset)
    for tower, path in paths.items():
        print(f"{tower}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.check:
        import numpy as np
        import onnxruntime as ort

        from ..tokenizer import tokenize

        s = model.image_size
        x = torch.randn(3, 3, s, s)
        ids = tokenize(["a photo of a dog", "two red circles", ""])
        with torch.inference_mode():
            ref_i, ref_t = model.encode_image(x).numpy(), model.text(ids).numpy()
        got_i = ort.InferenceSession(str(paths["image"])).run(None, {"pixel_values": x.numpy()})[0]
        got_t = ort.InferenceSession(str(paths["text"])).run(None, {"input_ids": ids.numpy()})[0]
        di, dt = float(np.abs(got_i - ref_i).max()), float(np.abs(got_t - ref_t).max())
        print(f"ONNX Runtime vs torch: image max abs diff {di:.2e}, text {dt:.2e}")
        if max(di, dt) > 1e-4:
            print("error: ONNX outputs differ from torch by more than 1e-4")
            return 1
    return 0
