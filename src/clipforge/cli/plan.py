"""``clipforge plan MODEL``: FLOPs per sample, total compute, days on N devices and memory per
device of a training run, counted on the real model (see :mod:`clipforge.plan`); ``--paper``
checks the planner against the CLIP paper's reported training times."""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from typing import Any

from .options import non_negative_float, output_file, positive_float, positive_int

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def count(text: str) -> int:
    """``400M``, ``1.2B``, ``5e9`` or ``1000000`` -> an integer >= 1."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    value = round(float(m.group(1)) * _SUFFIX[m.group(2)]) if m else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a count >= 1 such as 400M, 2B or 1000000, got {text!r}")
    return value


def mfu_value(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] (0.25 = 25%), got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from ..precision import TRAIN_PRECISIONS
    from ..plan import ACCELERATORS

    p = sub.add_parser(
        "plan", help="estimate a training run: FLOPs per sample, total compute, days on N devices, memory per device",
        description=textwrap.fill("FLOPs per sample (image + text towers, forward + backward, and the contrastive loss at the "
        "global batch) counted with torch.utils.flop_counter on the plain model built on the meta device (OpenAI's "
        "computation: every token, text at its full 77-token context; the basis for comparing with the paper), 2 FLOPs "
        "per multiply-accumulate, matmuls and convolutions only; also what clipforge's fast training path computes "
        "(last block for the pooled token only). Days = total FLOPs / (devices x peak x MFU). "
        "Memory per device (weights, gradients, AdamW states, activations measured from the tensors autograd "
        "saves, with and without gradient checkpointing, the logits and gathered features) and the largest "
        "micro-batch that fits. --paper compares with the CLIP paper's RN50x64 and ViT-L/14 training times.", 100))
    p.add_argument("model", nargs="?", help="architecture: zoo name (ViT-B/32, RN50x64, ...) or a CLIPConfig .json")
    p.add_argument("--samples", type=count, default=400_000_000, help="dataset size in pairs (400M, 2B, ...)")
    p.add_argument("--epochs", type=positive_float, default=32.0, help="passes over the dataset")
    p.add_argument("--global-batch", type=positive_int, default=32768, help="pairs per optimiser step, all devices")
    p.add_argument("--precision", choices=TRAIN_PRECISIONS, default="amp", metavar="PRECISION",
                   help=f"training precision, clipforge train's names [{' | '.join(TRAIN_PRECISIONS)}]")
    p.add_argument("--tf32", action="store_true", help="fp32 matmuls run as TF32 (A100/H100 peak for tf32)")
    p.add_argument("--accelerator", default="A100", metavar="NAME",
                   help=f"preset [{' | '.join(ACCELERATORS)}] or custom (then --peak-tflops and --memory-gb)")
    p.add_argument("--peak-tflops", type=positive_float, help="dense peak TFLOP/s in the compute dtype "
                   "(overrides the preset's)")
    p.add_argument("--memory-gb", type=positive_float, help="device memory in GB (overrides the preset's)")
    p.add_argument("--devices", type=positive_int, default=8, help="number of accelerators")
    p.add_argument("--mfu", type=mfu_value, default=0.25,
                   help="model-FLOP utilisation assumed for the time (0.25: see README, 'Planning a run')")
    p.add_argument("--local-loss", action="store_true", help="each device computes only its rows of the "
                   "N x N logits (clipforge train --local-loss; what the paper did)")
    p.add_argument("--reserve-gb", type=non_negative_float, default=2.0,
                   help="memory set aside per device for the CUDA context, library workspaces and fragmentation")
    p.add_argument("--paper", action="store_true", help="compare with the CLIP paper's RN50x64 and ViT-L/14 "
                   "training times at --mfu (ignores the other run options)")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of tables")
    p.add_argument("--out", type=output_file, help="also write the JSON record to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plan import PlanConfig, make_plan, paper_check
    from ..utils import write_json

    if args.paper:
        rows = paper_check(args.mfu)
        record: Any = {"mfu": args.mfu, "runs": rows}
        text = _paper_table(rows, args.mfu)
    else:
        if not args.model:
            raise ValueError("a model is required (a zoo name such as ViT-B/32 or a config .json), or --paper")
        cfg = PlanConfig(model=args.model, samples=args.samples, epochs=args.epochs, global_batch=args.global_batch,
                         precision=args.precision, accelerator=args.accelerator, devices=args.devices, mfu=args.mfu,
                         peak_tflops=args.peak_tflops, memory_gb=args.memory_gb, tf32=args.tf32,
                         local_loss=args.local_loss,
                         reserve_gb=args.reserve_gb)
        record = make_plan(cfg)
        text = plan_table(record)
    if args.out:
        write_json(args.out, record)
    print(json.dumps(record, indent=2) if args.json else text)
    return 0


def _g(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def plan_table(plan: dict[str, Any]) -> str:
    """The human-readable form of a :func:`clipforge.plan.make_plan` record."""
    i, acc, f, t = plan["inputs"], plan["accelerator"], plan["flops_per_sample"], plan["time"]
    lines = [
        (f"plan: {plan['model']}, {i['samples']:,} pairs x {i['epochs']:g} epochs = {plan['samples_seen']:,.0f} samples, "
        f"global batch {i['global_batch']:,} ({plan['local_batch']:,} per device), {plan['steps']:,} steps"),
        (f"      {i['devices']} x {acc['name']} ({acc['peak_tflops']:g} TFLOP/s {i['compute_dtype']}, "
        f"{acc['memory_gb']:g} GB), precision {i['precision']}, "
        f"{'local' if i['local_loss'] else 'global'} loss"),
        "",
        "FLOPs per sample (GFLOP, 2 per multiply-accumulate; plain model: every token, full text context)",
        f"  image forward      {_g(f['image_forward']):>12}",
        f"  text forward       {_g(f['text_forward']):>12}",
        f"  backward           {_g(f['backward']):>12}",
        f"  contrastive loss   {_g(f['loss_fwd_bwd']):>12}   (fwd+bwd, this global batch)",
        f"  total              {_g(f['total']):>12}",
        f"  (+ recompute with gradient checkpointing: {_g(f['recompute_with_checkpointing'])})",
        (f"  clipforge fast path {_g(plan['fast_path_flops_per_sample']['total']):>12}   (total; last block for the "
         "pooled token only, full context, before padding trim)"),
        "",
        f"total compute  {plan['total_flops']:.3e} FLOPs",
        (f"time           {t['days']:,.2f} days on {i['devices']} devices at MFU {t['mfu']:.0%} "
        f"({t['device_days']:,.0f} device-days)"),
        "",
        "memory per device (GB)           no checkpointing   checkpointing",
    ]
    m0, m1 = plan["memory_per_device"]["without_checkpointing"], plan["memory_per_device"]["with_checkpointing"]
    labels = {"weights": "weights", "gradients": "gradients", "adamw_states": "AdamW states",
              "autocast_weight_copies": "autocast weight copies", "activations": "activations",
              "loss_logits_and_gathered_features": "logits + gathered features", "reserve": "reserve",
              "total": "total"}
    for key, label in labels.items():
        lines.append(f"  {label:<30}{m0['bytes'][key] / 1e9:>14.2f}{m1['bytes'][key] / 1e9:>16.2f}")
    for label, k in (("fits at the local batch", "fits"), ("largest micro-batch", "largest_micro_batch"),
                     ("accumulation steps needed", "accum_steps_needed")):
        lines.append(f"  {label:<30}{_fmt(m0[k]):>14}{_fmt(m1[k]):>16}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "-" if v is None else str(v)


def _paper_table(rows: list[dict[str, Any]], mfu: float) -> str:
    lines = [(f"CLIP paper check: 32 epochs x 400M pairs, batch 32,768, amp on V100 (125 TFLOP/s), MFU {mfu:.0%}; "
              "FLOPs of the plain model (OpenAI's computation: every token, full 77-token text context)"),
             (f"{'model':<10}{'GPUs':>6}{'GFLOP/sample':>14}{'total FLOPs':>13}{'planned days':>14}"
             f"{'paper days':>12}{'ratio':>7}{'implied MFU':>13}")]
    for r in rows:
        lines.append(f"{r['model']:<10}{r['devices']:>6}{r['flops_per_sample'] / 1e9:>14,.0f}{r['total_flops']:>13.2e}"
                     f"{r['planned_days']:>14.1f}{r['paper_days']:>12.0f}{r['ratio']:>7.2f}{r['implied_mfu']:>13.1%}")
    lines.append("clipforge's fast training path (last block for the pooled token only) computes "
                 + ", ".join(f"{r['model']} {r['fast_path_flops_per_sample'] / 1e9:,.0f}" for r in rows)
                 + " GFLOP/sample")
    return "\n".join(lines)
