"""AdamW step time by torch implementation: the per-tensor loop (torch's default on a CPU), ``foreach``
and ``fused`` (what ``clipforge.training.optim.build_optimizer`` picks on CPU and CUDA), over the
trainable parameters of real model configs with CLIP's weight-decay groups. The three optimisers
step in alternation, in one process, from the same gradients; medians and ranges of ``--reps``.

    python benchmarks/optimizer_step.py [--models ViT-B-32,benchmarks/configs/flickr8k-ref.json,tiny-vit]
                                        [--reps 7] [--threads 2]

Writes benchmarks/results/optimizer_step.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, print_table, threads, write_results  # noqa: E402

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def model_config(name: str):
    from clipforge import get_model_config
    from clipforge.config import CLIPConfig

    return CLIPConfig.from_json(name) if name.endswith(".json") else get_model_config(name)


def bench(name: str, reps: int) -> dict[str, object]:
    from clipforge import create_model
    from clipforge.training.optim import build_optimizer, param_groups

    model = create_model(model_config(name), seed=0)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opts = {}
    for kind, kw in KINDS.items():
        groups = param_groups(model, 0.1, None)
        for group in groups:
            group.pop("names"), group.pop("lr_scale", None)
        opts[kind] = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **kw)
    chosen = build_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-6).defaults
    timings = alternate({k: o.step for k, o in opts.items()}, reps=reps, warmup=1)
    n = sum(p.numel() for p in model.parameters())
    row: dict[str, object] = {"model": Path(name).stem, "params_m": n / 1e6,
                              "clipforge_uses": "fused" if chosen.get("fused") else "loop"}
    for kind, t in timings.items():
        row[f"{kind}_ms"] = t.median * 1e3
        row[f"{kind}_range_ms"] = [min(t.times) * 1e3, max(t.times) * 1e3]
    row["loop_over_fused"] = timings["loop"].median / timings["fused"].median
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B-32,benchmarks/configs/flickr8k-ref.json,tiny-vit")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with threads(args.threads):
        rows = [bench(m.strip(), args.reps) for m in args.models.split(",") if m.strip()]
        env = environment()
    print_table(rows, [("model", "model", ""), ("params_m", "M params", ".1f"), ("loop_ms", "loop ms", ".1f"),
                       ("foreach_ms", "foreach ms", ".1f"), ("fused_ms", "fused ms", ".1f"),
                       ("loop_over_fused", "loop/fused", ".2f"), ("clipforge_uses", "clipforge", "")])
    path = write_results("optimizer_step", {"benchmark": "optimizer_step", "env": env, "reps": args.reps,
                                            "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
