"""ImageNet zero-shot pipeline end to end: 1,000 classes x 80 templates (80k prompts) through the
text tower, 1,000 real ImageNet photos through the image tower, scoring, then the cached rebuild.

Model: ViT-B/32-shaped with random weights (no pretrained weights can be downloaded here), so
accuracy is at chance (0.1% top-1, 0.5% top-5) and reported as such; the point is the time of
each stage. The model is prepared by ``optimize_for_inference`` (``--plain``: not). Prompts are
embedded one template at a time in length-sorted batches: the text tower trims each batch to its
longest prompt and computes the template's shared first tokens once; a side measurement compares
length-sorted with input-order batching on a sample of the prompts. The second
classifier build must hit the on-disk cache (target < 1 s: one sha256 pass over the text tower).

    python benchmarks/zeroshot_imagenet.py                 # full (cold build takes several minutes)
    python benchmarks/zeroshot_imagenet.py --quick         # 100 classes / 100 photos
    python benchmarks/zeroshot_imagenet.py --checkpoint model.safetensors
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_results  # noqa: E402

import clipforge  # noqa: E402
from clipforge.eval import InMemoryLabelled, ZeroShotClassifier, load_classnames, load_templates  # noqa: E402
from clipforge.eval.features import extract_features  # noqa: E402
from clipforge.eval.metrics import chunked_topk, metrics_from_topk  # noqa: E402
from clipforge.eval.zeroshot import prompts_for  # noqa: E402
from clipforge.inference import embed_texts, optimize_for_inference  # noqa: E402
from clipforge.preprocess import image_transform  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet_samples"


def load_samples(root: Path, limit: int | None) -> tuple[list[Image.Image], np.ndarray]:
    with open(root / "labels.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if limit:
        rows = rows[:limit]
    with tarfile.open(root / "images_160.tar") as tf:
        images = [Image.open(tf.extractfile(r["image"])).convert("RGB") for r in rows]
    return images, np.array([int(r["class_index"]) for r in rows])


@torch.inference_mode()
def embed_in_input_order(model, prompts: list[str], batch_size: int) -> torch.Tensor:
    """The naive baseline: batches in input order (each padded to its own longest prompt)."""
    from clipforge.inference import batched
    from clipforge.tokenizer import get_tokenizer

    tok = get_tokenizer(model.context_length)
    return torch.cat([model.encode_text(tok.tokenize(b, model.context_length, truncate=True), normalize=True)
                      for b in batched(prompts, batch_size)])


def padded_tokens(prompts: list[str], batch_size: int, context_length: int = 77) -> dict[str, int]:
    """Token positions the text tower runs (each batch trimmed to its longest prompt), for
    length-sorted vs input-order batching: the noise-free measure of the work sorting saves."""
    from clipforge.tokenizer import get_tokenizer

    lengths = get_tokenizer(context_length).tokenize(prompts, context_length, truncate=True).argmax(-1) + 1
    def cost(ls: torch.Tensor) -> int:
        return int(sum(int(ls[i:i + batch_size].max()) * len(ls[i:i + batch_size]) for i in range(0, len(ls), batch_size)))
    return {"sorted": cost(lengths.sort().values), "input_order": cost(lengths), "unpadded": int(lengths.sum())}


def sorting_gain(model, prompts: list[str], batch_size: int, reps: int = 3) -> dict[str, float]:
    """Time length-sorted batching (``embed_texts``) against input-order batching on the same
    prompts (alternating, best of ``reps``: the machine is shared, so single timings drift)."""
    best = {"sorted": float("inf"), "unsorted": float("inf")}
    out = {}
    for _ in range(reps):
        for name, fn in (("sorted", embed_texts), ("unsorted", embed_in_input_order)):
            t0 = time.perf_counter()
            out[name] = fn(model, prompts, batch_size=batch_size)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {"prompts": len(prompts), "batch_size": batch_size, "sorted_s": best["sorted"],
            "unsorted_s": best["unsorted"], "speedup": best["unsorted"] / best["sorted"],
            "token_positions": padded_tokens(prompts, batch_size),
            "max_abs_diff": float((out["sorted"] - out["unsorted"]).abs().max())}


def reference_head_rates(model, classnames, templates, n_classes: int = 10) -> dict[str, dict[str, float]]:
    """Prompts/s of the reference libraries building a zero-shot head, measured on ``n_classes``
    classes x all templates (OpenCLIP's own builder batches 10 classes' prompts at a time, at
    full context 77) with the same weights; the full build time is extrapolated from the rate.
    clipforge is timed on the same prompts, in the same run, through its own builder."""
    from clipforge.checkpoints import hf as hf_format, openai as openai_format
    from clipforge.eval.zeroshot import build_zeroshot_weights

    out: dict[str, dict[str, float]] = {}
    names = classnames[:n_classes]
    prompts = prompts_for(names, templates)[0]
    sd = openai_format.from_native({k: v for k, v in model.state_dict().items()})
    ids77 = clipforge.tokenize(prompts, truncate=True)
    fns = {"clipforge": lambda: build_zeroshot_weights(model, names, templates)}
    try:
        import open_clip

        oc = open_clip.create_model(model.config.name.replace("/", "-") + "-quickgelu", pretrained=None).eval()
        oc.load_state_dict(sd, strict=True)
        fns["openclip"] = lambda: oc.encode_text(ids77)
    except Exception as e:  # noqa: BLE001 - not importable here (needs torchvision)
        print(f"note: OpenCLIP reference skipped ({type(e).__name__}: {e})")
    try:
        import transformers

        cfg, _ = hf_format.config_to_hf(model.config)
        hf = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in cfg.items()
                                                             if k not in ("architectures", "model_type")})).eval()
        hf.load_state_dict(hf_format.from_native(model.state_dict()), strict=False)
        n = int(ids77.argmax(-1).max()) + 1  # CLIPProcessor pads to the batch's longest prompt
        fns["transformers"] = lambda: hf.get_text_features(input_ids=ids77[:, :n])
    except Exception as e:  # noqa: BLE001
        print(f"note: transformers reference skipped ({type(e).__name__}: {e})")
    with torch.inference_mode():
        for name, fn in fns.items():
            fn()  # warm-up
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            out[name] = {"prompts": len(prompts), "seconds": dt, "prompts_per_s": len(prompts) / dt,
                         "extrapolated_1000x80_s": 1000 * len(templates) * dt / len(prompts)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="ViT-B/32", help="zoo name (random init) unless --checkpoint is given")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--quick", action="store_true", help="first 100 classes and their photos")
    ap.add_argument("--text-batch-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--sorting-batch-size", type=int, default=100)
    ap.add_argument("--sorting-sample", type=int, default=2000, help="prompts for the sorted-vs-unsorted check (0: skip)")
    ap.add_argument("--sorting-only", action="store_true",
                    help="only redo the sorted-vs-input-order measurement and update it in the existing results JSON")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary directory (cold build)")
    ap.add_argument("--out", default="zeroshot_imagenet")
    ap.add_argument("--plain", action="store_true", help="skip optimize_for_inference (packed weights etc.)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    ap.add_argument("--reference-classes", type=int, default=10,
                    help="classes (x all templates) timed with OpenCLIP/transformers/clipforge side by side (0: skip)")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"no ImageNet samples at {args.data}", file=sys.stderr)
        return 1

    n_cls = 100 if args.quick else 1000
    if args.checkpoint:
        model, preprocess = clipforge.load(args.checkpoint)
        model_name = args.checkpoint
    else:
        model = clipforge.create_model(args.model, seed=0)
        preprocess = image_transform(model.config.preprocess)
        model_name = f"{args.model} (random init)"
    model.eval()
    if not args.plain:
        optimize_for_inference(model, precision=args.precision)
    classnames = load_classnames("imagenet")[:n_cls]
    templates = load_templates("imagenet")
    images, labels = load_samples(args.data, n_cls)
    keep = labels < n_cls
    ds = InMemoryLabelled([im for im, k in zip(images, keep) if k], labels[keep], classnames, "imagenet_samples")
    n_prompts = len(prompts_for(classnames, templates)[0])
    print(f"{model_name}: {len(classnames)} classes x {len(templates)} templates = {n_prompts} prompts; "
          f"{len(ds)} photos; torch threads {torch.get_num_threads()}")

    if args.sorting_only:
        prompts = prompts_for(classnames, templates)[0]
        sample = random.Random(0).sample(prompts, min(args.sorting_sample or 1000, len(prompts)))
        sg = sorting_gain(model, sample, args.sorting_batch_size)
        print(f"length-sorted batching on {sg['prompts']} prompts (batches of {sg['batch_size']}): {sg['sorted_s']:.1f}s "
              f"vs input order {sg['unsorted_s']:.1f}s (x{sg['speedup']:.2f}; token positions {sg['token_positions']}; "
              f"max |diff| {sg['max_abs_diff']:.1e})")
        full = padded_tokens(prompts, args.text_batch_size)
        print(f"full build ({len(prompts)} prompts, batches of {args.text_batch_size}): token positions {full}")
        sg["full_build_token_positions"] = full
        from _common import RESULTS
        import json

        path = RESULTS / f"{args.out}{'_quick' if args.quick else ''}.json"
        if path.is_file():
            payload = json.loads(path.read_text())
            payload["length_sorting"] = {**sg, "measured": environment()["time"]}
            path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
            print(f"updated {path}")
        return 0

    tmp = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="clipforge-zs-")
        cache_dir = tmp.name
    results: dict[str, object] = {"model": model_name, "precision": "plain" if args.plain else args.precision, "classes": len(classnames), "templates": len(templates),
                                  "prompts": n_prompts, "images": len(ds), "environment": environment()}
    rows = []

    if args.sorting_sample:
        prompts = prompts_for(classnames, templates)[0]
        sample = random.Random(0).sample(prompts, min(args.sorting_sample, len(prompts)))
        sg = sorting_gain(model, sample, args.sorting_batch_size)
        sg["full_build_token_positions"] = padded_tokens(prompts, args.text_batch_size)
        results["length_sorting"] = sg
        print(f"length-sorted batching on {sg['prompts']} prompts (batches of {sg['batch_size']}): {sg['sorted_s']:.1f}s "
              f"vs input order {sg['unsorted_s']:.1f}s (x{sg['speedup']:.2f}; token positions {sg['token_positions']})")

    if args.reference_classes:
        refs = reference_head_rates(model, classnames, templates, args.reference_classes)
        results["reference_head_rates"] = refs
        for name, r in refs.items():
            print(f"  {name}: {r['prompts_per_s']:.1f} prompts/s on {r['prompts']} prompts -> "
                  f"1000x{len(templates)} head in ~{r['extrapolated_1000x80_s'] / 60:.1f} min (extrapolated)")

    t0 = time.perf_counter()
    clf = ZeroShotClassifier(model, classnames, templates, preprocess=preprocess, cache_dir=cache_dir,
                             batch_size=args.text_batch_size, progress=True)
    cold = time.perf_counter() - t0
    rows.append({"stage": "classifier build (cold)", "seconds": cold, "items": n_prompts,
                 "rate": n_prompts / cold, "unit": "prompts/s", "note": f"cache_hit={clf.cache_hit}"})

    t0 = time.perf_counter()
    fs = extract_features(model, ds, ds.labels, preprocess=preprocess, batch_size=args.batch_size, progress=True)
    feat_s = time.perf_counter() - t0
    rows.append({"stage": "image features", "seconds": feat_s, "items": len(fs), "rate": len(fs) / feat_s,
                 "unit": "images/s", "note": f"skipped={fs.skipped}"})

    t0 = time.perf_counter()
    top, _ = chunked_topk(fs.features, clf.weights, k=5, scale=clf.logit_scale)
    metrics = metrics_from_topk(top, fs.labels, len(classnames))
    score_s = time.perf_counter() - t0
    rows.append({"stage": "scoring (top-5)", "seconds": score_s, "items": len(fs), "rate": len(fs) / score_s,
                 "unit": "images/s", "note": ""})

    t0 = time.perf_counter()
    warm = ZeroShotClassifier(model, classnames, templates, preprocess=preprocess, cache_dir=cache_dir,
                              batch_size=args.text_batch_size)
    warm_s = time.perf_counter() - t0
    assert warm.cache_hit and torch.equal(warm.weights, clf.weights), "second build did not hit the cache"
    rows.append({"stage": "classifier build (cached)", "seconds": warm_s, "items": n_prompts,
                 "rate": n_prompts / warm_s, "unit": "prompts/s", "note": f"cache_hit={warm.cache_hit}; target < 1 s"})

    chance1, chance5 = 1 / len(classnames), min(5, len(classnames)) / len(classnames)
    results.update({"stages": rows, "metrics": metrics, "chance": {"acc1": chance1, "acc5": chance5},
                    "accuracy_note": "random weights: accuracy is expected at chance level"})
    print()
    print_table(rows, [("stage", "stage", "s"), ("seconds", "seconds", ".2f"), ("items", "items", "d"),
                       ("rate", "rate", ".1f"), ("unit", "unit", "s"), ("note", "note", "s")])
    print(f"\ntop-1 {metrics['acc1']:.4f} (chance {chance1:.4f}), top-5 {metrics['acc5']:.4f} (chance {chance5:.4f}), "
          f"mean per-class recall {metrics['mean_per_class_recall']:.4f}"
          + ("  [random weights: chance level expected]" if not args.checkpoint else ""))
    path = write_results(args.out + ("_quick" if args.quick else ""), results)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
