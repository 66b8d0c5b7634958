"""``clipforge eval zeroshot|retrieval|linear-probe|fewshot|robustness|image_caption_selection|suite``: thin wrappers
over :mod:`clipforge.eval.tasks` that write one JSON record per run and print a table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .options import (ListAction, add_inference_model_options, add_long_text_options, add_progress_option, any_int,
                      existing_file, fraction,
                      load_model_arg,
                      nonempty_str, output_dir, output_file, positive_float, positive_int, shift_list)


def _c_value(text: str) -> Any:
    """``auto`` or a number > 0 (fewshot's inverse L2 strength)."""
    return "auto" if text.strip().lower() == "auto" else positive_float(text)


def _common(p: argparse.ArgumentParser, dataset_required: bool | None = True, model_required: bool = True) -> None:
    add_inference_model_options(p, required=model_required)
    if dataset_required is not None:
        p.add_argument("--dataset", required=dataset_required, type=nonempty_str,
                       help="dataset spec: image folder | csv/jsonl manifest | shards | .npz | builtin:scenes-<task>")
    p.add_argument("--split", default=None, help="split of --dataset to read (default: the dataset's test split)")
    p.add_argument("--out", default="eval_results", type=output_dir, help="output directory for JSON records")
    p.add_argument("--text-batch-size", type=positive_int, default=256, help="texts per forward pass")
    p.add_argument("--cache-dir", default=None, type=output_dir,
                   help="cache for zero-shot heads and features (default ~/.cache/clipforge)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    add_long_text_options(p, default="truncate", what="zero-shot prompts and retrieval captions")
    add_progress_option(p)


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", default=None, type=nonempty_str,
                   help="training dataset spec (with --test, instead of splitting --dataset)")
    p.add_argument("--test", default=None, type=nonempty_str, help="test dataset spec")
    p.add_argument("--train-split", default=None, help="split name of --dataset used for training")
    p.add_argument("--test-split", default=None, help="split name of --dataset used for testing")
    p.add_argument("--test-fraction", type=fraction, default=0.5,
                   help="with a single dataset: stratified fraction held out for testing")
    p.add_argument("--seed", type=any_int, default=0, help="seed of the train/test split and the draws")
    p.add_argument("--max-iter", type=positive_int, default=1000, help="L-BFGS iterations per fit")
    p.add_argument("--classnames", default=None, help="class-name file or built-in set (imagenet, cifar10, ...)")


def _zs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classnames", default=None, help="class-name file (one per line) or built-in set (imagenet, cifar10, ...)")
    p.add_argument("--templates", default="auto",
                   help="template set (imagenet, simple, none, cifar10, ...) or file with one '{}' (or '{c}') template "
                        "per line; auto = the dataset's own templates, else the set of a built-in --classnames, else a "
                        "set guessed from the dataset name, else the generic 'a photo of a {}.' (the choice is printed "
                        "and recorded)")


def register(subparsers: Any) -> None:
    ev = subparsers.add_parser("eval", help="zero-shot, retrieval, linear-probe, few-shot and robustness evaluation",
                               description="Evaluate a CLIP model; every command writes JSON records and prints a table.")
    sub = ev.add_subparsers(dest="eval_command", metavar="TASK")
    ev.set_defaults(func=lambda a: (ev.print_help(), 2)[1])

    p = sub.add_parser("zeroshot", help="zero-shot classification with a prompt-ensembled head")
    _common(p)
    _zs_args(p)
    p.add_argument("--compare-prompts", action="store_true",
                   help="also score the bare class name and a single template, and report the ensemble's gain")
    p.add_argument("--save-classifier", default=None, type=output_file, help="write the built head (safetensors) here")
    p.set_defaults(func=_cmd_zeroshot)

    p = sub.add_parser("retrieval", help="image<->text Recall@K (several captions per image)")
    _common(p)
    p.add_argument("--ks", action=ListAction, item=positive_int, default=[1, 5, 10], metavar="K,K",
                   help="K values of Recall@K (default: 1,5,10)")
    p.add_argument("--ties", default="clip_benchmark", choices=["clip_benchmark", "query"],
                   help="tie rule for equal scores: clip_benchmark (torch.topk order, as CLIP_benchmark) or query "
                        "(ties go to the query: the optimistic bound)")
    p.set_defaults(func=_cmd_retrieval)

    p = sub.add_parser("linear-probe", help="logistic regression on frozen image features (L-BFGS, C searched)")
    _common(p, dataset_required=False)
    _probe_args(p)
    p.add_argument("--C", type=positive_float, default=None,
                   help="fix the inverse L2 strength instead of searching it (default: searched)")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="train fraction held out to choose C")
    p.set_defaults(func=_cmd_linear_probe)

    p = sub.add_parser("fewshot", help="k-shot linear probes vs zero-shot")
    _common(p, dataset_required=False)
    _probe_args(p)
    p.add_argument("--templates", default="auto", help="templates for the zero-shot reference")
    p.add_argument("--shots", action=ListAction, item=positive_int, default=[1, 2, 4, 8, 16], metavar="K,K",
                   help="k values (default: 1,2,4,8,16)")
    p.add_argument("--seeds", type=positive_int, default=3, help="random draws per k")
    p.add_argument("--C", default="auto", type=_c_value,
                   help="inverse L2 strength, or 'auto' (searched on half the shots)")
    p.set_defaults(func=_cmd_fewshot)

    p = sub.add_parser("robustness", help="accuracy under image shifts, zero-shot vs linear probe")
    _common(p, dataset_required=False)
    _probe_args(p)
    p.add_argument("--templates", default="auto", help="templates for the zero-shot head")
    p.add_argument("--shifts", default="all", type=shift_list,
                   help="comma-separated: grayscale,blur,noise,jpeg,lowres,sketch,invert (name:severity allowed); 'all'")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC", type=_variant,
                   help="a user-supplied shifted copy of the test set (repeatable)")
    p.add_argument("--no-linear-probe", action="store_true", help="zero-shot only")
    p.add_argument("--C", type=positive_float, default=None,
                   help="fix the linear probe's inverse L2 strength (default: searched)")
    p.set_defaults(func=_cmd_robustness)

    p = sub.add_parser("image_caption_selection", aliases=["image-caption-selection"],
                       help="choose each image's caption among hard negatives (SugarCREPE, Winoground-style groups)",
                       description="Text / image / group scores (CLIP_benchmark's text_acc / image_acc / acc) and "
                                   "accuracy per negative type.")
    _common(p, dataset_required=False)
    p.set_defaults(func=_cmd_selection, dataset="builtin:scenes-selection")
    p.epilog = ("--dataset: builtin:scenes-selection[?n_per_type=50&seed=0&size=64] (default) | a JSONL file "
                "(image, caption, negatives, optional group, type) | a SugarCREPE <task>.json (images in "
                "val2017/ beside it) | a folder of either")

    p = sub.add_parser("suite", help="run many tasks from a YAML file; writes records + an HTML report")
    _common(p, dataset_required=None, model_required=False)
    p.add_argument("--suite", required=True, type=existing_file, help="YAML file listing tasks")
    p.add_argument("--force", action="store_true", help="re-run tasks whose records already exist")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.set_defaults(func=_cmd_suite)


def _variant(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name.strip() or not spec.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC, got {text!r}")
    return name.strip(), spec.strip()


# --- commands ----------------------------------------------------------------------------------------

def _context(args: argparse.Namespace, batch_size: int | None = None) -> Any:
    from ..eval.tasks import EvalContext
    from ..loading import model_label

    model, preprocess = load_model_arg(args)
    name = model_label(args.model, random_init=args.random_init, seed=args.seed_init)
    pretrained = f"random-init-seed{args.seed_init}" if args.random_init else str(args.model)
    return EvalContext(model, preprocess, name, pretrained=pretrained, batch_size=batch_size or args.batch_size,
                       text_batch_size=args.text_batch_size, cache_dir=args.cache_dir,
                       use_cache=not args.no_cache, progress=args.progress, long_text=args.long_text,
                       long_text_overlap=args.long_text_overlap)


def _finish(args: argparse.Namespace, records: list[dict[str, Any]]) -> int:
    from ..eval.records import records_table, save_record

    paths = [save_record(args.out, r) for r in records]
    print(records_table(records))
    for r in records:
        if r.get("skipped"):
            print(f"note: {r['skipped']} unreadable item(s) skipped in {r['dataset']}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def _probe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dataset=args.dataset, train=args.train, test=args.test, split=args.split,
                train_split=args.train_split, test_split=args.test_split, test_fraction=args.test_fraction,
                seed=args.seed, classnames=args.classnames, max_iter=args.max_iter)


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from ..eval.tasks import run_zeroshot

    ctx = _context(args)
    rec = run_zeroshot(ctx, args.dataset, split=args.split, classnames=args.classnames, templates=args.templates,
                       compare_prompts=args.compare_prompts, save_classifier=args.save_classifier)
    t = rec["timings"]
    print(f"classifier: {rec['num_classes']} classes x {len(rec['templates'])} templates "
          f"({'cache hit' if t['classifier_cache_hit'] else 'built'} in {t['classifier_build']:.2f}s); "
          f"features {t['features']:.1f}s; scoring {t['scoring']:.2f}s")
    if args.compare_prompts:
        for label, m in rec["prompt_comparison"].items():
            print(f"  {label:16s} templates={m['templates']:3d}  acc1={m['acc1']:.4f}")
    if args.save_classifier:
        print(f"wrote {args.save_classifier}")
    return _finish(args, [rec])


def _cmd_retrieval(args: argparse.Namespace) -> int:
    from ..eval.tasks import run_retrieval

    rec = run_retrieval(_context(args), args.dataset, split=args.split, ks=args.ks, ties=args.ties)
    return _finish(args, [rec])


def _cmd_linear_probe(args: argparse.Namespace) -> int:
    from ..eval.tasks import run_linear_probe

    rec = run_linear_probe(_context(args), C=args.C, val_fraction=args.val_fraction, **_probe_kwargs(args))
    print(f"chosen C = {rec['C']:.4g} ({len(rec['C_search'])} values tried); protocol: {rec['protocol']}")
    return _finish(args, [rec])


def _cmd_fewshot(args: argparse.Namespace) -> int:
    from ..eval.tasks import run_fewshot

    rec = run_fewshot(_context(args), shots=args.shots, seeds=args.seeds, C=args.C, templates=args.templates,
                      **_probe_kwargs(args))
    from ..eval.records import format_table

    rows = [{"shots": int(k), "mean_acc1": v["mean"], "std": v["std"]} for k, v in rec["curve"].items()]
    print(format_table(rows))
    print(f"zero-shot acc1 = {rec['metrics']['zeroshot_acc1']}; shots to match zero-shot: "
          f"{rec['metrics']['shots_to_match_zeroshot']} ({rec['matching_note']})")
    return _finish(args, [rec])


def _cmd_robustness(args: argparse.Namespace) -> int:
    from ..eval.records import format_table
    from ..eval.tasks import run_robustness

    variants = dict(args.variant)
    rec = run_robustness(_context(args), shifts=args.shifts, variants=variants, templates=args.templates,
                         linear_probe_on=not args.no_linear_probe, C=args.C, **_probe_kwargs(args))
    cols = ["shift", "zeroshot_acc1", "zeroshot_drop"] + ([] if args.no_linear_probe else ["linear_probe_acc1", "linear_probe_drop"])
    print(format_table(rec["shifts"], cols))
    return _finish(args, [rec])


def _cmd_selection(args: argparse.Namespace) -> int:
    from ..eval.records import format_table
    from ..eval.selection import run_image_caption_selection

    if args.split:
        raise ValueError("image_caption_selection: --split does not apply (a set is one file or the built-in pairs)")
    records = run_image_caption_selection(_context(args), args.dataset)
    for r in records:
        if r["per_type"]:
            rows = [{"type": t, **m} for t, m in r["per_type"].items()]
            print(f"{r['dataset']} per negative type:\n{format_table(rows, ['type', 'n', 'text_acc', 'image_acc', 'acc'])}\n")
    return _finish(args, records)


def _cmd_suite(args: argparse.Namespace) -> int:
    from ..eval.records import records_table
    from ..eval.suite import run_suite

    def make_context(model: str | None, defaults: dict[str, Any]) -> Any:
        if not model:
            raise ValueError(f"{args.suite}: no model given (pass --model or set 'model:' in the suite)")
        args.model = model
        ctx = _context(args)
        for k, v in defaults.items():
            setattr(ctx, k, v)
        return ctx

    records = run_suite(args.suite, args.out, make_context=make_context, model=args.model, force=args.force,
                        report=not args.no_report)
    print(records_table(records))
    print(f"wrote {Path(args.out) / 'results.jsonl'}" + ("" if args.no_report else f" and {Path(args.out) / 'report.html'}"))
    return 0
