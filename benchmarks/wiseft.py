"""WiSE-FT on built-in scenes: pre-train a tiny CLIP contrastively on captioned scenes, fine-tune it
on a labelled scene task (default: ``seen_colour_shape``, 8 colour-shape classes) and report the
WiSE-FT alpha curve - clean (in-distribution) test accuracy against accuracy under the image shifts
(grayscale, blur, noise, jpeg, lowres, sketch, invert) - with the zero-shot (alpha 0) and
fine-tuned (alpha 1) endpoints.

    python benchmarks/wiseft.py [--quick] [--pretrain-steps 400] [--finetune-steps 150]
                                [--recipes ce,flyp] [--task seen_colour_shape] [--workdir DIR]

Train and test images of the task are drawn with different seeds (disjoint scenes of the same
distribution); the pre-training data is the scenes' own train split (captions, no labels).
Writes ``benchmarks/results/wiseft.json`` (``wiseft_quick.json`` with ``--quick``) and a PNG per
task and recipe beside it, and prints the table. The pre-trained model and fine-tuning runs live in ``--workdir``
and are reused by a second invocation (both runs are resumable). Budget: about 10 CPU-minutes
with the defaults on 2 cores; ``--quick`` (~1-2 min) only checks the pipeline - its numbers mean little.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, environment, print_table, threads, write_results  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run (numbers not meaningful)")
    p.add_argument("--model", default="tiny-vit-p16", help="architecture pre-trained on scenes")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--tasks", default="seen_colour_shape,position",
                   help="comma list of scene tasks to fine-tune on: seen_colour_shape | heldout_colour_shape | "
                        "counting | position")
    p.add_argument("--train-per-class", type=int, default=80)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--recipes", default="ce", help="comma list of fine-tuning recipes: ce, flyp")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the pre-training's data worker takes the second core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None,
                   help="runs folder, reused across invocations (default: <tmp>/clipforge-bench-wiseft[-quick])")
    args = p.parse_args()
    if args.quick:
        args.pretrain_steps, args.pretrain_batch = min(args.pretrain_steps, 30), min(args.pretrain_batch, 32)
        args.train_per_class, args.test_per_class = min(args.train_per_class, 16), min(args.test_per_class, 8)
        args.finetune_steps, args.alphas = min(args.finetune_steps, 8), "0,0.5,1"
        args.tasks = args.tasks.split(",")[0]
    name = "wiseft_quick" if args.quick else "wiseft"
    workdir = args.workdir or Path(tempfile.gettempdir()) / f"clipforge-bench-{name.replace('_', '-')}"

    from clipforge.finetune import FinetuneConfig, finetune
    from clipforge.training import TrainConfig, resolve_model_config, train

    started = time.time()
    size = resolve_model_config(args.model).vision.image_size
    pre_dir = workdir / "pretrain"
    with threads(args.threads):
        t0 = time.time()
        if not (pre_dir / "final.safetensors").is_file():
            resume = (pre_dir / "config.json").is_file()
            summary = train(TrainConfig(
                model=args.model, data=f"builtin:scenes?n=200000&size={size}", steps=args.pretrain_steps,
                batch_size=args.pretrain_batch, lr=1e-3, wd=0.1, warmup=min(50, args.pretrain_steps // 5),
                grad_clip=1.0, num_workers=1, seed=args.seed, out=str(pre_dir), resume=str(pre_dir) if resume else None,
                save_every=100, keep_last=1, log_every=20, eval_every=0, threads=args.threads))
            pretrain = {k: summary.get(k) for k in ("steps_done", "final_loss", "wall_time_s", "samples_per_s_median")}
        else:
            saved = json.loads((pre_dir / "summary.json").read_text())
            if saved.get("steps") != args.pretrain_steps or saved.get("model") != args.model:
                raise SystemExit(f"{pre_dir} holds a pre-training of {saved.get('model')} for {saved.get('steps')} steps, "
                                 f"not {args.model} for {args.pretrain_steps}; choose another --workdir")
            pretrain = {k: saved.get(k) for k in ("steps_done", "final_loss", "wall_time_s", "samples_per_s_median")}
            pretrain["reused"] = str(pre_dir / "final.safetensors")
        pretrain_s = time.time() - t0
        ckpt = str(pre_dir / "final.safetensors")
        runs = {}
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            spec = f"builtin:scenes-{task}?size={size}"
            for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
                t1 = time.time()
                result = finetune(FinetuneConfig(
                    model=ckpt, dataset=f"{spec}&seed=1&n_per_class={args.train_per_class}",
                    test_dataset=f"{spec}&seed=0&n_per_class={args.test_per_class}", recipe=recipe,
                    steps=args.finetune_steps, lr=args.lr, batch_size=args.batch_size,
                    warmup=min(10, args.finetune_steps // 10), wise_alphas=[float(a) for a in args.alphas.split(",")],
                    seed=args.seed, out=str(workdir / f"ft-{task}-{recipe}"), save_wise_models=False,
                    threads=args.threads, device="cpu", progress=True))
                runs[(task, recipe)] = {"result": result, "seconds": time.time() - t1}

    payload: dict = {"benchmark": "wiseft", "quick": args.quick, "settings": vars(args) | {"workdir": str(workdir)},
                     "environment": environment(), "pretrain": pretrain | {"seconds": pretrain_s, "model": args.model},
                     "runs": {}}
    for (task, recipe), run in runs.items():
        res = run["result"]
        rows = []
        for rec in res.records:
            m = rec["metrics"]
            rows.append({"alpha": rec["alpha"], "clean": m["acc1"], "shifted": m.get("mean_shift_acc1"),
                         **{s["shift"]: s["acc1"] for s in rec["shifts"][1:]}})
        print(f"\nWiSE-FT ({recipe}, {res.steps_done} steps) on scenes/{task}: "
              f"{res.summary['n_train']} train / {res.summary['n_test']} test images, "
              f"chance {1 / res.summary['num_classes']:.3f}")
        shift_cols = [(k, k, ".3f") for k in rows[0] if k not in ("alpha", "clean", "shifted")] if rows else []
        print_table(rows, [("alpha", "alpha", ".1f"), ("clean", "clean acc", ".3f"),
                           ("shifted", "mean shifted", ".3f"), *shift_cols])
        png = RESULTS / f"{name}_{task}_{recipe}.png"
        if res.files.get("png"):
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(res.files["png"], png)
        by_alpha = {r["alpha"]: r for r in rows}
        best = max(rows, key=lambda r: (r["clean"] + (r["shifted"] or 0)) / 2) if rows else None
        payload["runs"][f"{task}/{recipe}"] = {
            "task": task, "recipe": recipe, "chance": 1 / res.summary["num_classes"], "steps": res.steps_done,
            "seconds": run["seconds"], "summary": res.summary, "curve": rows,
            "zeroshot": by_alpha.get(0.0), "finetuned": by_alpha.get(1.0),
            "best_alpha_by_mean_of_clean_and_shifted": best, "png": str(png.relative_to(REPO)),
            "records": res.records}
    payload["wall_time_s"] = time.time() - started
    out = write_results(name, payload)
    print(f"\nwrote {out} ({payload['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
