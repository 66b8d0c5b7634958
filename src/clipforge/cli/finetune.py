"""``clipforge finetune``: fine-tune a CLIP model on a labelled dataset (head initialised from the
zero-shot classifier, or FLYP), then sweep WiSE-FT weight interpolation between the zero-shot and
fine-tuned models and evaluate each alpha clean and under image shifts.

Re-running the same command continues an interrupted run (newest checkpoint) and skips finished
work (the fine-tuned model, alphas already evaluated). Exit codes: 0 done, 1 bad input,
130/143 stopped by SIGINT/SIGTERM after writing a checkpoint (128 + the signal, as `train`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .options import (ListAction, add_device_option, add_progress_option, add_trust_torchscript_option, any_int,
                      existing_path, fraction, non_negative_float, non_negative_int, nonempty_str, output_dir,
                      positive_float, positive_int, shift_list, unit_interval)
from .train_recipes import add_model_recipe_arguments, model_recipe_values


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune", help="robust fine-tuning: zero-shot-initialised head or FLYP, then the WiSE-FT alpha curve",
        description="Fine-tune a CLIP model on a labelled dataset (head initialised from the zero-shot classifier, "
                    "or FLYP), then sweep WiSE-FT weight interpolation between the zero-shot and fine-tuned models "
                    "and evaluate each alpha clean and under image shifts. Re-run the same command to continue.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="CKPT", type=existing_path,
                   help="the zero-shot model: a checkpoint in any format clipforge reads")
    add_trust_torchscript_option(g)
    g.add_argument("--dataset", required=True, type=nonempty_str,
                   help="labelled training data: image folder | csv/jsonl manifest | shards | .npz | builtin:scenes-<task>")
    g.add_argument("--train-split", default=None, help="split of --dataset to train on (default: the whole dataset)")
    g.add_argument("--test-dataset", default=None, type=nonempty_str,
                   help="labelled test data (default: --dataset; with neither --test-dataset nor --test-split a "
                        "stratified --test-fraction of --dataset is held out)")
    g.add_argument("--test-split", default=None, help="split of the test dataset")
    g.add_argument("--test-fraction", type=fraction, default=0.3, help="fraction held out for testing when train and "
                                                                       "test would be the same images")
    g.add_argument("--split-seed", type=any_int, default=0, help="seed of the hold-out and --max-test subsets")
    g.add_argument("--classnames", default=None,
                   help="class-name file (one per line) or built-in set (cifar10, imagenet, ...); default: the dataset's")
    g.add_argument("--templates", default=None,
                   help="template set name or file (one '{}' template per line); default: the dataset's own, "
                        "else the set of a built-in --classnames, else 'a photo of a {}.'")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--recipe", choices=("ce", "flyp"), default="ce",
                   help="ce: cross-entropy through a linear head on the image embedding; flyp: contrastive loss "
                        "between images and prompts of their class (text tower trained too unless --lock-text)")
    g.add_argument("--head", choices=("zeroshot", "linear"), default="zeroshot",
                   help="ce head initialisation: zeroshot = class text embeddings x logit scale; linear = zeros")
    g.add_argument("--lp-steps", type=non_negative_int, default=0,
                   help="LP-FT: train only the head for this many steps first (ce recipe)")
    length = g.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=positive_int, default=None, help="optimiser steps")
    length.add_argument("--epochs", type=positive_float, default=None,
                        help="passes over the training images (full batches)")
    g.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate (AdamW, cosine schedule)")
    g.add_argument("--wd", type=non_negative_float, default=0.1, help="AdamW weight decay on weight matrices")
    g.add_argument("--warmup", type=non_negative_int, default=0, help="linear warm-up steps")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    g.add_argument("--seed", type=any_int, default=0, help="seed of the batch order, prompts and noise shift")
    g = p.add_argument_group("WiSE-FT and evaluation")
    g.add_argument("--wise-alphas", action=ListAction, item=unit_interval, metavar="A,B",
                   default=[round(0.1 * k, 1) for k in range(11)],
                   help="interpolation weights of the fine-tuned model (0 = zero-shot, 1 = fine-tuned)")
    g.add_argument("--shifts", type=shift_list, default="all",
                   help="image shifts to evaluate under: all, or a list like grayscale,blur:2,noise "
                        "(grayscale blur noise jpeg lowres sketch invert)")
    g.add_argument("--save-wise-models", action=argparse.BooleanOptionalAction, default=True,
                   help="write each interpolated classifier to OUT/wise/alpha_A/")
    g.add_argument("--eval-batch-size", type=positive_int, default=64, help="images per evaluation forward pass")
    g.add_argument("--max-test", type=positive_int, default=None,
                   help="evaluate on a stratified subset of at most this many test images (default: all)")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, type=output_dir, help="run folder (re-run the same command to continue)")
    g.add_argument("--save-every", type=non_negative_int, default=0,
                   help="checkpoint every N steps (0: at the end and on SIGINT/SIGTERM only)")
    g.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints kept")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps per metrics.jsonl record")
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--json", action="store_true", help="print the run summary as JSON instead of the table")
    add_device_option(p)
    add_progress_option(p)
    add_model_recipe_arguments(p)  # train's flags (--lock-text: flyp's text tower; ce never trains it)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..finetune import (  # each command imports its capability when it runs
        FinetuneConfig,
        finetune,
    )
    from ..training.signals import exit_code

    config = FinetuneConfig(
        model=args.model, dataset=args.dataset, out=args.out, classnames=args.classnames, templates=args.templates,
        train_split=args.train_split, test_dataset=args.test_dataset, test_split=args.test_split,
        test_fraction=args.test_fraction, split_seed=args.split_seed, recipe=args.recipe, head=args.head,
        lp_steps=args.lp_steps, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, wd=args.wd, warmup=args.warmup, grad_clip=args.grad_clip, seed=args.seed,
        wise_alphas=list(dict.fromkeys(args.wise_alphas)), shifts=args.shifts, save_wise_models=args.save_wise_models,
        eval_batch_size=args.eval_batch_size, max_test=args.max_test, save_every=args.save_every,
        keep_last=args.keep_last, log_every=args.log_every, progress=args.progress, threads=args.threads,
        device=args.device, trust_torchscript=args.trust_torchscript, **model_recipe_values(args))
    result = finetune(config)
    if result.status != "completed":
        print(f"stopped at step {result.steps_done}/{result.steps} ({result.status}); re-run the same command to "
              "continue", file=sys.stderr)
        return exit_code(result.signal) if result.signal is not None else 130
    if args.json:
        print(json.dumps({**result.summary, "files": result.files}, indent=2))
    else:
        print(result.table)
        for kind, path in result.files.items():
            print(f"{kind}: {path}")
    return 0
