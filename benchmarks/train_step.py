"""Training-step throughput and memory: clipforge vs OpenCLIP and a plain loop over ``transformers.CLIPModel``.

For each (model, batch) row every implementation gets the same architecture (random init), the
same batches (random images, Flickr8k captions) and AdamW. A step is forward + loss + backward +
optimiser step + temperature clamp. clipforge runs its real training step
(``clipforge.training.step.TrainStep``); OpenCLIP (when importable: it needs torchvision) runs
``open_clip.CLIP`` built from the same config with its ``ClipLoss`` on full-context ids, as its
training loop does; HF runs ``model(input_ids, pixel_values, return_loss=True).loss.backward()``
with ids padded to 77 as in the ``transformers`` contrastive example (``hf-pad77``), and also
with ids cut to the batch's longest caption (``hf-longest``, the fairest HF baseline; clipforge
trims the same way and then packs each caption's real tokens, so its text products follow the
captions' mean length).

Each implementation lives in its own worker process (so peak RSS is its own) and the parent asks
them for steps in alternation (ABC, CBA, ... so slow drifts of the shared machine hit all
equally), after warm-up steps; the median of ``--reps`` is reported with samples/s and the peak
RSS (VmHWM) of the worker. Each worker first counts one untimed step's product FLOPs (torch's flop
counter: mm / addmm / bmm / convolutions, forward and backward), so a row reports how many
products each implementation computes and at what share of this run's measured fp32 GEMM peak.

    python benchmarks/train_step.py [--rows tiny-vit:64,tiny-vit:128,ViT-B-32:64] [--reps 5] [--quick]
        [--patch-dropout 0,0.5,0.75]

``--patch-dropout P,...`` (FLIP, ``clipforge train --force-patch-dropout``): every implementation
that has it (clipforge, OpenCLIP) is also run with that fraction of patch tokens dropped, as
``<impl>@pd<P>`` in the same alternation; clipforge keeps ``round((1-P) * N)`` patches per image,
OpenCLIP ``int((1-P) * N)`` (equal for the rows' N = 49 and 64 at P = 0.5 / 0.75 up to one token).
Each such row reports ``product_flop_ratio``: the step's product FLOPs without dropout over those
with it (the speed-up if time followed the products; not a bound, as the per-token work that is not
a product shrinks with the tokens too).
A model may also be a CLIPConfig ``.json`` (e.g. benchmarks/configs/flickr8k-ref.json: ViT width
256, 6+6 layers, patch 8, 64 px, the Flickr8k reference run).

Writes benchmarks/results/train_step.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import matmul_peak_gflops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
IMPLS = ("clipforge", "clipforge-bf16", "openclip", "openclip-bf16", "hf-pad77", "hf-longest")
PRODUCT_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "convolution_backward")


def _proc_kb(field: str) -> float:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return float(m.group(1)) if m else float("nan")


def load_captions(data: Path, n: int) -> list[str]:
    path = data / "flickr8k" / "captions.tsv"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            col = f.readline().rstrip("\n").split("\t").index("caption")
            caps = [line.rstrip("\n").split("\t")[col] for line in f]
        return caps[:n]
    words = "a man woman dog child in the red blue shirt is running on grass with ball near water".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 8)) for i in range(n)]


def hf_config(cfg: Any) -> Any:
    """An HF CLIPConfig with the sizes of a clipforge CLIPConfig (ViT image tower only)."""
    from transformers import CLIPConfig as HFConfig

    if cfg.vision.kind != "vit":
        raise ValueError("the HF comparison supports ViT towers only")
    v, t = cfg.vision, cfg.text
    act = "quick_gelu" if cfg.activation == "quick_gelu" else "gelu"
    return HFConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                         num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                         hidden_act=act, layer_norm_eps=cfg.norm_eps, projection_dim=cfg.embed_dim),
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           hidden_act=act, layer_norm_eps=cfg.norm_eps, projection_dim=cfg.embed_dim),
        projection_dim=cfg.embed_dim, logit_scale_init_value=cfg.init_logit_scale)


# --- worker side -----------------------------------------------------------------------------------


def model_config(name: str) -> Any:
    """A zoo name or a CLIPConfig ``.json`` path."""
    from clipforge import get_model_config
    from clipforge.config import CLIPConfig

    return CLIPConfig.from_json(name) if name.endswith(".json") else get_model_config(name)


def worker(impl: str, model_name: str, batch: int, n_batches: int, threads: int, data: Path,
           patch_dropout: float = 0.0) -> None:
    import torch

    from clipforge import create_model
    from clipforge.tokenizer import tokenize

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = model_config(model_name)
    caps = load_captions(data, batch * n_batches)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
                tokenize(caps[i * batch:(i + 1) * batch], truncate=True)) for i in range(n_batches)]
    if impl in ("clipforge", "clipforge-bf16"):
        from clipforge.training.loss import ClipLoss
        from clipforge.training.optim import build_optimizer
        from clipforge.training.step import FeatureModel, TrainStep

        from clipforge import fast

        from clipforge.training.recipes import set_patch_dropout

        model = create_model(cfg, seed=0).train()
        fast.enable(model)  # what `clipforge train` does (TrainConfig.fast_paths, on by default)
        set_patch_dropout(model, patch_dropout)  # --force-patch-dropout
        opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-6)
        # clipforge-bf16: `clipforge train --precision amp_bf16` (or auto where bf16 pays): bf16 products
        # under autocast through the fast layer, fp32 master weights, attention softmax, LayerNorm, loss.
        step_fn = TrainStep(model, FeatureModel(model), ClipLoss(), opt,
                            precision="amp_bf16" if impl == "clipforge-bf16" else "fp32")

        def step(images: torch.Tensor, ids: torch.Tensor) -> float:
            return step_fn([(images, ids)]).loss
    elif impl in ("openclip", "openclip-bf16"):
        import contextlib

        import open_clip

        from clipforge.checkpoints import openclip_model_cfg

        oc_cfg = openclip_model_cfg(cfg)
        if patch_dropout:  # open_clip's vision_cfg.patch_dropout (what --force-patch-dropout sets)
            oc_cfg["vision_cfg"] = {**oc_cfg["vision_cfg"], "patch_dropout": patch_dropout}
        model = open_clip.CLIP(**oc_cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
        loss_fn = open_clip.ClipLoss()
        # openclip-bf16: open_clip_train --precision amp_bf16 (torch autocast to bfloat16).
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if impl == "openclip-bf16" \
            else contextlib.nullcontext

        def step(images: torch.Tensor, ids: torch.Tensor) -> float:
            # OpenCLIP's training loop: full-context ids (77), its ClipLoss, AdamW, clamp.
            opt.zero_grad(set_to_none=True)
            with autocast():
                image_features, text_features, logit_scale = model(images, ids)[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            return loss.item()
    else:
        if patch_dropout:
            raise ValueError(f"{impl} has no patch dropout")
        from transformers import CLIPModel

        model = CLIPModel(hf_config(cfg)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
        trim = impl == "hf-longest"

        def step(images: torch.Tensor, ids: torch.Tensor) -> float:
            if trim:
                ids = ids[:, : int(ids.argmax(-1).max()) + 1]
            mask = (ids != 0).long()
            mask[:, 0] = 1
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, pixel_values=images, attention_mask=mask, return_loss=True)
            out.loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            return out.loss.item()

    print(json.dumps({"ready": True, "build_s": time.perf_counter() - t0,
                      "rss_mb": _proc_kb("VmRSS") / 1024}), flush=True)
    i = 0
    for line in sys.stdin:
        if line.strip() == "flops":  # one untimed step under torch's flop counter: its products
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step(*batches[0])
            ops = counter.get_flop_counts().get("Global", {})
            products = sum(v for op, v in ops.items() if str(op).split(".")[1] in PRODUCT_OPS)
            print(json.dumps({"product_flops": products, "counted_flops": counter.get_total_flops()}), flush=True)
            continue
        if line.strip() != "step":
            break
        images, ids = batches[i % n_batches]
        i += 1
        before = _proc_kb("VmRSS") / 1024
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        loss = step(images, ids)
        dt = time.perf_counter() - t
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(json.dumps({"time_s": dt, "loss": loss, "rss_before_mb": before, "minor_faults": faults,
                          "peak_rss_mb": _proc_kb("VmHWM") / 1024}), flush=True)


# --- parent side -----------------------------------------------------------------------------------


class Worker:
    def __init__(self, impl: str, model: str, batch: int, args: argparse.Namespace, patch_dropout: float = 0.0) -> None:
        self.impl = f"{impl}@pd{patch_dropout:g}" if patch_dropout else impl
        cmd = [sys.executable, __file__, "--worker", impl, "--model", model, "--batch", str(batch),
               "--n-batches", str(args.n_batches), "--threads", str(args.threads), "--data", str(args.data),
               "--worker-patch-dropout", str(patch_dropout)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"worker {self.impl} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def flops(self) -> dict[str, Any]:
        self.proc.stdin.write("flops\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def step(self) -> dict[str, Any]:
        self.proc.stdin.write("step\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def bench_row(model: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    workers = [Worker(impl, model, batch, args, pd) for impl in args.impls for pd in args.patch_dropout
               if pd == 0 or not impl.startswith("hf")]
    times: dict[str, list[float]] = {w.impl: [] for w in workers}
    peaks: dict[str, float] = {w.impl: 0.0 for w in workers}
    losses: dict[str, float] = {}
    last: dict[str, float] = {}
    faults: dict[str, list[int]] = {w.impl: [] for w in workers}
    try:
        flops = {w.impl: w.flops() for w in workers}
        peak = matmul_peak_gflops(n=2048, reps=3)["peak"]  # the ceiling for '% of peak', this run's threads
        for rep in range(args.warmup + args.reps):
            order = workers if rep % 2 == 0 else workers[::-1]
            for w in order:
                r = w.step()
                peaks[w.impl] = max(peaks[w.impl], r["peak_rss_mb"])
                losses[w.impl] = r["loss"]
                last[w.impl] = r["time_s"]
                if rep >= args.warmup:
                    faults[w.impl].append(r["minor_faults"])
                if rep >= args.warmup:
                    times[w.impl].append(r["time_s"])
            label = "warm-up" if rep < args.warmup else f"rep {rep + 1 - args.warmup}/{args.reps}"
            print(f"  {model} b{batch} {label}: " + ", ".join(f"{w.impl} {last[w.impl]:.3f}s" for w in workers),
                  file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.close()
    out = {"model": model, "batch": batch, "threads": args.threads, "patch_dropout": args.patch_dropout, "reps": args.reps, "warmup": args.warmup,
           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "fp32_peak_gflops": peak, "results": {}}
    for w in workers:
        med = statistics.median(times[w.impl])
        gflop = flops[w.impl]["product_flops"] / 1e9
        out["results"][w.impl] = {"median_step_s": med, "samples_per_s": batch / med, "step_times_s": times[w.impl],
                                  "product_gflop": gflop, "counted_gflop": flops[w.impl]["counted_flops"] / 1e9,
                                  "product_gflops_per_s": gflop / med, "of_fp32_peak": gflop / med / peak,
                                  "peak_rss_mb": peaks[w.impl], "build_s": w.info["build_s"], "last_loss": losses[w.impl],
                                  "minor_page_faults_median": statistics.median(faults[w.impl])}
    for impl, r in out["results"].items():  # what patch dropout would give if time followed the step's products
        if "@pd" in impl and impl.split("@pd")[0] in out["results"]:
            r["product_flop_ratio"] = out["results"][impl.split("@pd")[0]]["product_gflop"] / r["product_gflop"]
    base = out["results"].get("clipforge")
    if base:
        for impl, r in out["results"].items():
            r["clipforge_speedup"] = r["median_step_s"] / base["median_step_s"]
    return out


def available_impls(wanted: list[str]) -> list[str]:
    """Drop OpenCLIP (with a message) when it cannot be imported (it needs torchvision)."""
    if any(i.startswith("openclip") for i in wanted):
        try:
            import open_clip  # noqa: F401
        except Exception as e:  # ImportError, or torchvision's operator error beside a CPU torch
            print(f"note: OpenCLIP not importable ({type(e).__name__}: {e}); its rows are skipped", file=sys.stderr)
            wanted = [i for i in wanted if not i.startswith("openclip")]
    return wanted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="tiny-vit:64,tiny-vit:128,ViT-B-32:64", help="model:batch,...")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--quick", action="store_true", help="tiny-vit at batch 16, 1 warm-up + 2 reps (smoke test)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_step.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the other rows already in --out (rows of the same model and batch are replaced)")
    p.add_argument("--patch-dropout", default="0",
                   help="patch-dropout fractions, comma-separated; 0 = none (default 0; e.g. 0,0.5,0.75)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-patch-dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.batch, args.n_batches, args.threads, args.data, args.worker_patch_dropout)
        return 0
    if args.quick:
        args.rows, args.reps, args.warmup = "tiny-vit:16", 2, 1
        if args.out == p.get_default("out"):
            args.out = args.out.with_name("train_step_quick.json")
    args.patch_dropout = sorted({float(x) for x in args.patch_dropout.split(",") if x.strip()} | {0.0})
    if any(not 0 <= x < 1 for x in args.patch_dropout):
        p.error(f"--patch-dropout values must be in [0, 1), got {args.patch_dropout}")
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impls {bad}; choose from {IMPLS}")
    args.impls = available_impls(args.impls)
    rows = []
    for spec in args.rows.split(","):
        model, _, batch = spec.partition(":")
        rows.append(bench_row(model.strip(), int(batch or 64), args))
    import torch

    record = {
        "benchmark": "train_step", "task": "one contrastive training step (forward, loss, backward, AdamW)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "note": "shared 2-core CPU; other jobs may run concurrently"},
        "reps": args.reps, "warmup": args.warmup, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from clipforge.utils import read_json, write_json

    if args.merge and args.out.is_file():
        mine = {(r["model"], r["batch"]) for r in rows}
        kept = [r for r in read_json(args.out).get("rows", []) if (r["model"], r["batch"]) not in mine]
        record["rows"] = rows = kept + rows

    write_json(args.out, record)
    print(f"\n{'model':<10} {'batch':>5} {'impl':<20} {'s/step':>8} {'samples/s':>10} {'peak RSS MB':>12} {'vs clipforge':>13}"
          f" {'product GFLOP':>14} {'GFLOP/s':>8} {'of peak':>8}")
    for row in rows:
        for impl, r in row["results"].items():
            print(f"{row['model']:<10} {row['batch']:>5} {impl:<20} {r['median_step_s']:>8.3f} {r['samples_per_s']:>10.1f} "
                  f"{r['peak_rss_mb']:>12.0f} {r.get('clipforge_speedup', float('nan')):>12.2f}x"
                  f" {r.get('product_gflop', float('nan')):>14.1f} {r.get('product_gflops_per_s', float('nan')):>8.1f}"
                  f" {100 * r.get('of_fp32_peak', float('nan')):>7.0f}%")
        if "fp32_peak_gflops" in row:
            print(f"{row['model']} b{row['batch']}: fp32 GEMM peak measured in this run {row['fp32_peak_gflops']:.0f} GFLOP/s "
                  "(product FLOPs: torch's flop counter over one step's mm / addmm / bmm / convolutions)")
    for row in rows:
        res = row["results"]
        for a, b in (("clipforge-bf16", "clipforge"), ("openclip-bf16", "openclip"), ("clipforge-bf16", "openclip-bf16")):
            if a in res and b in res:
                print(f"{row['model']} b{row['batch']}: {a} / {b} = {res[a]['samples_per_s'] / res[b]['samples_per_s']:.2f}x")
    for row in rows:  # patch dropout: samples/s against the same implementation without it
        res = row["results"]
        for impl, r in res.items():
            plain = impl.split("@pd")[0]
            if "@pd" in impl and plain in res:
                ratio = r.get("product_flop_ratio")
                print(f"{row['model']} b{row['batch']}: {impl} / {plain} = "
                      f"{r['samples_per_s'] / res[plain]['samples_per_s']:.2f}x samples/s"
                      + (f" (product FLOP ratio of the two steps {ratio:.2f}x)" if ratio else ""))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
