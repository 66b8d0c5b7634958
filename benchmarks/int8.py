"""int8 inference (dynamic quantization of the Transformer products) vs fp32 and bf16: speed, and
what it changes in the embeddings and in task results.

- Speed: ViT-B/32 (random weights) image encoding at batch 16 and 64 and text encoding of 256
  Flickr8k captions, fp32 / bf16 / int8 ``optimize_for_inference``, alternating in one process.
- Drift: min and mean cosine to fp32 of the bf16 and int8 embeddings of Flickr8k test photos and
  captions, for ViT-B/32 and for a trained checkpoint (``--trained``, e.g. the Flickr8k run of
  benchmarks/bf16_training.py).
- Task change (trained checkpoint): CIFAR-10 zero-shot top-1 (stratified subset) and Flickr8k test
  retrieval Recall@1/5/10 in fp32, bf16 and int8 (feature caches off: every number is computed).

    python benchmarks/int8.py --trained /tmp/cf-bf16/flickr8k/fp32-s0/final.safetensors [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, environment, print_table, write_results  # noqa: E402
from encode import captions  # noqa: E402
from eval_real import DEFAULT_DATA, Flickr8kPairs, subset  # noqa: E402

import clipforge  # noqa: E402
from clipforge.fast import backend_record, optimize_for_inference  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")


def variants(model: clipforge.CLIP) -> dict[str, clipforge.CLIP]:
    return {p: optimize_for_inference(copy.deepcopy(model), precision=p) for p in PRECISIONS}


def drift(models: dict[str, clipforge.CLIP], images: torch.Tensor, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    out = {}
    with torch.inference_mode():
        ref_i = torch.nn.functional.normalize(models["fp32"].encode_image(images).float(), dim=-1)
        ref_t = torch.nn.functional.normalize(models["fp32"].encode_text(ids).float(), dim=-1)
        for p, m in models.items():
            if p == "fp32":
                continue
            i = torch.nn.functional.normalize(m.encode_image(images.to(m.dtype)).float(), dim=-1)
            t = torch.nn.functional.normalize(m.encode_text(ids).float(), dim=-1)
            ci, ct = (i * ref_i).sum(-1), (t * ref_t).sum(-1)
            out[p] = {"image_min_cos": float(ci.min()), "image_mean_cos": float(ci.mean()),
                      "text_min_cos": float(ct.min()), "text_mean_cos": float(ct.mean())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B/32")
    ap.add_argument("--trained", type=Path, help="a trained checkpoint for drift and task change")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cifar-n", type=int, default=2000)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"quantized engine: {torch.backends.quantized.engine} (supported {torch.backends.quantized.supported_engines})")

    pairs = Flickr8kPairs(args.data / "flickr8k", "test", 256)
    ids = clipforge.tokenize(captions(256), truncate=True)
    result: dict[str, object] = {"env": environment(), "backend": backend_record(),
                                 "quantized_engine": torch.backends.quantized.engine}

    # --- speed and drift, ViT-B/32 -----------------------------------------------------------------
    base = clipforge.create_model(args.model, seed=0).eval()
    models = variants(base)
    pre = clipforge.image_transform(base.config.preprocess)
    photos = torch.stack([pre(s.image) for s in pairs.samples])
    rows = []
    with torch.inference_mode():
        for b in (16, 64):
            x = photos[:b]
            t = alternate({p: (lambda m=m, x=x: m.encode_image(x.to(m.dtype))) for p, m in models.items()},
                          reps=args.reps, warmup=1)
            rows += [{"work": f"{args.model} image", "batch": b, "precision": p, **t[p].summary(b)} for p in t]
        t = alternate({p: (lambda m=m: m.encode_text(ids)) for p, m in models.items()}, reps=args.reps, warmup=1)
        rows += [{"work": f"{args.model} text", "batch": len(ids), "precision": p, **t[p].summary(len(ids))} for p in t]
    fp32_speed = {(r["work"], r["batch"]): r["items_per_s"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        r["x_fp32"] = r["items_per_s"] / fp32_speed[(r["work"], r["batch"])]
        r["range"] = f"{r['items_per_s_min']:.1f}-{r['items_per_s_max']:.1f}"
    print_table(rows, [("work", "work", ""), ("batch", "batch", "d"), ("precision", "precision", ""),
                       ("items_per_s", "items/s", ".1f"), ("range", "min-max", ""), ("x_fp32", "x fp32", ".2f")])
    result["speed"] = rows
    result["drift"] = {args.model + " (random weights)": drift(models, photos, ids)}
    del models

    # --- a trained model: drift and task change -------------------------------------------------------
    if args.trained:
        from clipforge.eval.tasks import EvalContext, run_retrieval, run_zeroshot

        trained = clipforge.load(args.trained, fast=False)[0]
        tm = variants(trained)
        pre = clipforge.image_transform(trained.config.preprocess)
        result["drift"][str(args.trained)] = drift(tm, torch.stack([pre(s.image) for s in pairs.samples]), ids)
        cifar = subset(str(args.data / "cifar10_test" / "cifar10_test.npz"), args.cifar_n)
        flickr = Flickr8kPairs(args.data / "flickr8k", "test")
        tasks = {}
        for p, m in tm.items():
            ctx = EvalContext(m, pre, str(args.trained), use_cache=False, log=None)
            zs = run_zeroshot(ctx, cifar, templates="cifar10")["metrics"]
            rt = run_retrieval(ctx, flickr)["metrics"]
            tasks[p] = {"cifar10_zeroshot_acc1": zs["acc1"],
                        **{k: v for k, v in rt.items() if "recall@" in k}}
            print(f"{p}: CIFAR-10 zero-shot top-1 {zs['acc1']:.4f}; Flickr8k T->I R@1/5/10 "
                  + "/".join(f"{rt[f'image_retrieval_recall@{k}']:.3f}" for k in (1, 5, 10))
                  + "; I->T " + "/".join(f"{rt[f'text_retrieval_recall@{k}']:.3f}" for k in (1, 5, 10)))
        result["tasks"] = tasks
    for name, d in result["drift"].items():  # type: ignore[union-attr]
        for p, v in d.items():
            print(f"drift vs fp32, {name}, {p}: image min/mean cos {v['image_min_cos']:.5f}/{v['image_mean_cos']:.5f}, "
                  f"text {v['text_min_cos']:.5f}/{v['text_mean_cos']:.5f}")
    path = write_results("int8", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
