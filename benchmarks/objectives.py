"""The paper's Figure 2 on this machine: which objective learns zero-shot transfer from the fewest
images? ``clipforge experiment objectives`` (:func:`clipforge.experiments.run_objectives`) on two
datasets:

* ``scenes`` (default): the demo's model, data, optimiser, schedule and batch; zero-shot on
  held-out colour-shape combinations (never drawn or named in training), chance 1/8.
* ``flickr8k``: the 6,000 Flickr8k training photos x 5 captions from ../shared/data, zero-shot on
  CIFAR-10 test images (a fixed class-stratified sample) with CLIP's 18 CIFAR-10 templates.

Three runs per seed (contrastive, bow, caption) of the same images, evaluated every
``--eval-every`` steps; reported: accuracy vs images seen (JSON + PNG, log x), and the images each
objective needed to first reach the accuracy every run reached, as ratios to contrastive (the
paper: bag-of-words ~3x fewer than a caption model, contrastive another ~4x).

    python benchmarks/objectives.py [--dataset scenes|flickr8k] [--steps 1000] [--eval-every 50] [--first-eval 5]
                                    [--seeds 0,1,2] [--workdir /tmp/cf-exp] [--minutes M]

Runs live in ``--workdir`` and are reused / resumed; the result JSON and plot go to
benchmarks/results/objectives[_flickr8k].{json,png}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402
from train_real import DEFAULT_DATA, build_manifest  # noqa: E402  (Flickr8k shards -> a JSONL manifest)


def bow_calibration(run_dir: str, task_name: str) -> dict[str, float]:
    """The bag-of-words run's final model on the held-out task (the training evaluation's scenes),
    scored as specified (mean log p(token | image) of each prompt's tokens) and calibrated
    (log p(token | image) - log of its mean over the scored images: the token prior removed, a
    per-class constant), to separate "the image says nothing" from "the prior drowns it"."""
    import numpy as np
    import torch

    from clipforge.checkpoints import load_model
    from clipforge.eval import ZeroShotClassifier
    from clipforge.training import SceneZeroShot

    model = load_model(Path(run_dir) / "final.safetensors").eval()
    task = SceneZeroShot().tasks(model.image_size)[task_name]
    clf = ZeroShotClassifier(model, list(task.classnames), list(task.templates), use_cache=False)
    feats = clf.image_features(task.images)
    with torch.no_grad():
        log_probs = model.bow_logits(feats.float()).float().log_softmax(dim=-1)
    prior = log_probs.exp().mean(dim=0).log()
    labels = np.asarray(task.labels)
    plain = (log_probs @ clf.weights.t()).argmax(1).numpy()
    calibrated = ((log_probs - prior) @ clf.weights.t()).argmax(1).numpy()
    return {"as_specified": float((plain == labels).mean()), "calibrated": float((calibrated == labels).mean()),
            "distinct_predictions": int(len(set(plain.tolist()))),
            "distinct_predictions_calibrated": int(len(set(calibrated.tolist())))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("scenes", "flickr8k"), default="scenes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--first-eval", type=int, help="also evaluate at this step and its doublings below --eval-every")
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--zeroshot-n", type=int, default=1000, help="CIFAR-10 images scored (flickr8k)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, help="budget; re-run to continue")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (flickr8k)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cf-exp"))
    args = p.parse_args()

    from clipforge.experiments import ObjectivesConfig, format_objectives, run_objectives

    extra = {}
    if args.dataset == "flickr8k":
        folder = args.workdir / "flickr8k-data"
        manifest = folder / "manifest.jsonl"
        if not manifest.is_file():
            build_manifest(args.data, folder)
        extra = dict(data=str(manifest), zeroshot=str(args.data / "cifar10_test" / "cifar10_test.npz"),
                     templates="cifar10", zeroshot_n=args.zeroshot_n)
    config = ObjectivesConfig(out=str(args.workdir / args.dataset), seeds=tuple(int(s) for s in args.seeds.split(",")),
                              steps=args.steps, eval_every=args.eval_every, first_eval=args.first_eval,
                              threads=args.threads,
                              minutes=args.minutes, progress=False, **extra)
    result = run_objectives(config)
    name = "objectives" if args.dataset == "scenes" else f"objectives_{args.dataset}"
    png = REPO / "benchmarks" / "results" / f"{name}.png"
    shutil.copyfile(result["plot"], png)
    result = {**result, "env": environment(), "plot": str(png.relative_to(REPO)), "dataset": args.dataset}
    if args.dataset == "scenes" and "bow" in result["runs"]:
        result["bow_calibration"] = {s: bow_calibration(r["run_dir"], config.task)
                                     for s, r in result["runs"]["bow"].items() if r["status"] == "completed"}
    path = write_results(name, result)
    print(format_objectives(result))
    for s, c in result.get("bow_calibration", {}).items():
        print(f"bow seed {s}, final model: {c['as_specified']:.3f} as specified ({c['distinct_predictions']} classes "
              f"predicted), {c['calibrated']:.3f} with the token prior removed")
    print(f"\nwrote {path} and {png}")
    return 0 if result["status"] == "complete" else 3


if __name__ == "__main__":
    sys.exit(main())
