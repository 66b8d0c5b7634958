"""``clipforge info CKPT``: what a checkpoint is, read without loading the weights into a model.

Format, architecture (zoo name when the shapes and activation equal one), parameter counts, the
preprocessing and tokenizer its weights expect, the activation (and whether the file records it
or it is assumed), and a training summary when the checkpoint or its run folder records one
(clipforge training checkpoints and run folders, open_clip's ``epoch_N.pt``), and the tensors
that would make the model's outputs wrong (NaN/inf values, integer-typed weights).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .options import add_trust_torchscript_option, existing_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print what a checkpoint is: format, architecture, parameters, "
                                    "preprocessing, tokenizer, training summary",
                       description="Reads a checkpoint in any supported format (clipforge, OpenAI incl. "
                                   "TorchScript, OpenCLIP, Hugging Face) and describes it.")
    p.add_argument("checkpoint", type=existing_path, help="checkpoint file or folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_trust_torchscript_option(p)
    p.set_defaults(func=run)


def describe(path: str | Path, *, trust_torchscript: bool = False) -> dict[str, Any]:
    """The record ``clipforge info`` prints."""
    from ..checkpoints import read_checkpoint
    from ..config import available_models
    from ..families import FamilyConfig
    from ..models import model_class

    sd, info = read_checkpoint(path, trust_torchscript=trust_torchscript)
    cfg = info.config
    family = isinstance(cfg, FamilyConfig)
    if family:  # counted from the file: building a timm / HF tower is not needed to describe it
        counts = {"image": sum(v.numel() for k, v in sd.items() if k.startswith("visual.")),
                  "text": sum(v.numel() for k, v in sd.items() if k.startswith("text."))}
        n = {**counts, "total": sum(v.numel() for v in sd.values())}
    else:
        with torch.device("meta"):  # parameter counts from the architecture (BatchNorm buffers are not parameters)
            n = model_class(cfg)(cfg).num_parameters()
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point())
    scale, bias = sd.get("logit_scale"), sd.get("logit_bias")
    c = cfg.to_dict()
    if family:
        m = c["model_cfg"]
        c["vision"] = {"kind": cfg.vision.kind, **m.get("vision_cfg", {})}
        c["text"] = {"kind": cfg.text.kind, **m.get("text_cfg", {})}
    return {
        "path": str(path), "weights": str(info.weights), "format": info.format,
        "architecture": cfg.name if cfg.name in available_models() else (cfg.name or "custom"),
        "objective": cfg.objective,
        "parameters": {k: n[k] for k in ("total", "image", "text", "head") if k in n},
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "embed_dim": cfg.embed_dim, "vision": c["vision"], "text": c["text"],
        "activation": cfg.activation, "activation_recorded": "activation" not in info.assumed,
        "assumed": list(info.assumed),  # config fields the file does not record (defaults filled in)
        "logit_scale_exp": round(float(scale.float().exp()), 4) if scale is not None else None,
        # SigLIP-style models: the learned bias added to every logit (the sigmoid loss's); None: none.
        "logit_bias": round(float(bias.float()), 4) if bias is not None else None,
        # What the logits mean: a softmax over the batch (CLIP) or one sigmoid per pair (with a bias).
        "loss": "siglip" if bias is not None else "clip",
        "preprocess": c["preprocess"],
        "tokenizer": {**c["tokenizer"], "vocab_size": cfg.text.vocab_size},
        "training": training_summary(info.weights, info.extras),
        "nonfinite_tensors": list(info.nonfinite),  # names of tensors holding NaN/inf
        "integer_tensors": list(info.integer),  # weights stored with an integer dtype
    }


def training_summary(weights: Path, extras: dict[str, Any]) -> dict[str, Any] | None:
    """From the checkpoint's own training fields, else the run folder's ``summary.json``."""
    out: dict[str, Any] = {}
    for key in ("step", "epoch", "name"):
        if key in extras:
            out[key] = extras[key]
    tc = extras.get("train_config")
    if isinstance(tc, dict):
        out.update({k: tc[k] for k in ("model", "data", "steps", "batch_size", "lr", "loss") if k in tc})
    losses = [r for r in extras.get("metrics", []) if isinstance(r, dict) and "loss" in r]
    if losses:
        out["last_logged"] = {k: losses[-1][k] for k in ("step", "loss") if k in losses[-1]}
    summary = weights.parent / "summary.json"
    if not out and summary.is_file():
        from ..utils import read_json

        s = read_json(summary)
        keep = ("status", "steps_done", "steps", "model", "data", "samples_seen", "global_batch", "final_loss",
                "final_temperature", "wall_time_s", "last_eval")
        out = {k: s[k] for k in keep if k in s}
        out["source"] = str(summary)
    return out or None


def run(args: argparse.Namespace) -> int:
    from ..checkpoints.strict import describe_suspect

    rec = describe(args.checkpoint, trust_torchscript=args.trust_torchscript)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    v, t, p, n = rec["vision"], rec["text"], rec["preprocess"], rec["parameters"]
    if v["kind"] == "timm":
        tower = f"timm {v['timm_model_name']} (pool {v.get('timm_pool', 'avg')!r}, proj {v.get('timm_proj', 'linear')!r})"
    elif "heads" not in v:  # open_clip's ViT config (a family)
        tower = f"ViT {v.get('layers', 12)} layers x {v.get('width', 768)} wide, patch {v.get('patch_size', 16)}"
    else:
        tower = (f"{'SigLIP ViT (attention-pool head)' if v['kind'] == 'siglip' else 'ViT'} {v['layers']} layers x "
                 f"{v['width']} wide, {v['heads']} heads, patch {v['patch_size']}"
                 if v["kind"] in ("vit", "siglip") else f"ResNet stages {v['layers']}, width {v['width']}")
    text_tower = (f"Hugging Face {t['hf_model_name']}" if t.get("kind") == "hf" else
                  f"{t.get('layers', 12)} layers x {t.get('width', 512)} wide, {t.get('heads', 8)} heads"
                  + (", bidirectional, last-token pooling (SigLIP)" if t.get("kind") == "siglip" else ""))
    lines = [
        ("format", rec["format"]), ("weights", rec["weights"]), ("architecture", rec["architecture"]),
        ("parameters", f"{n['total'] / 1e6:.2f} M (image {n['image'] / 1e6:.2f} M, text {n['text'] / 1e6:.2f} M), "
                       f"{rec['dtype']}"),
        ("embed dim", rec["embed_dim"]), ("image tower", tower),
        ("text tower", text_tower),
        ("activation", rec["activation"] + ("" if rec["activation_recorded"] else " (not recorded: assumed)")),
        ("image size", p["image_size"]),
        ("preprocess", f"{p['resize_mode']} resize, {p['interpolation']}, mean {tuple(p['mean'])}, "
                       f"std {tuple(p['std'])}"),
        ("tokenizer", f"{rec['tokenizer']['kind']}, context length {rec['tokenizer']['context_length']}, "
                      f"vocabulary {rec['tokenizer']['vocab_size']}"),
        ("logit scale", f"exp = {rec['logit_scale_exp']}"),
        ("logit bias", "none (softmax/CLIP loss)" if rec["logit_bias"] is None
         else f"{rec['logit_bias']} (sigmoid/SigLIP loss)"),
    ]
    if rec["assumed"]:
        lines.append(("not recorded", ", ".join(rec["assumed"]) + " (defaults assumed; pass a config to be sure)"))
    if rec["training"]:
        lines.append(("training", ", ".join(f"{k} {val}" for k, val in rec["training"].items())))
    if rec["nonfinite_tensors"] or rec["integer_tensors"]:
        lines.append(("WARNING", describe_suspect(rec["nonfinite_tensors"], rec["integer_tensors"])))
    width = max(len(k) for k, _ in lines)
    for k, val in lines:
        print(f"{k:<{width}}  {val}")
    return 0
