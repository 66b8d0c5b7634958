"""GPU acceptance: exercise and time every CUDA path of clipforge in one short run (< 8 min on one H100).

    python benchmarks/gpu_acceptance.py                       # CUDA when present, ViT-B/32 + RN50
    python benchmarks/gpu_acceptance.py --device cpu --quick  # every non-CUDA row, tiny models (< 3 min)
    python benchmarks/gpu_acceptance.py --device cpu --smoke  # the test suite's smoke run (seconds of work)

Four sections, each run in its own worker process under a wall-clock limit (so a hung kernel or a
crashed CUDA context costs one section, not the run):

1. ``correctness``: plain / fast / inference-optimised models on the device vs the plain fp32 model on
   CPU (same weights): fp32 within 1e-4, amp_bf16 / amp (fp16) cosine >= 0.999; tokenizer +
   preprocessing through ``embed_images`` / ``embed_texts`` on the device; a checkpoint saved from
   the device reloads on CPU bit for bit.
2. ``training``: the largest amp_bf16 micro-batch that fits (doubling search, OOM caught), samples/s,
   peak memory, MFU from ``clipforge.plan``'s FLOP count; gradient checkpointing; local loss;
   ``torch.compile`` of the training module; open_clip's step on the same weights (ratio);
   ``clipforge train`` itself (~100 steps, built-in scenes); one-process torchrun (NCCL on CUDA)
   stopped by SIGTERM and resumed.
3. ``inference``: encode images/s and texts/s at several batches in fp32/bf16/fp16, vs open_clip and
   transformers on the same weights (converted by ``clipforge.checkpoints.convert``); compiled vs
   not; ``clipforge embed`` over generated images; ``clipforge eval zeroshot`` on CIFAR-10 (from
   ../shared/data when present); ``clipforge index`` + one ``serve`` query's latency.
4. ``plan``: ``clipforge plan`` predictions (memory, largest batch, step time) vs what training measured.

Every row ends ok / failed (the exception's first line) / skipped (the reason). Prints a table and
writes benchmarks/results/gpu_acceptance.json (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data"
SECTIONS = ("correctness", "training", "inference", "plan")
sys.path.insert(0, str(REPO / "src"))  # this checkout's clipforge, not an installed one


# --- profiles ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """Sizes and time limits of one kind of run (full GPU run, CPU --quick, test --smoke)."""

    name: str
    vit: str
    rn: str
    n_parity: int  # images / texts compared per parity row
    train_start_batch: int
    train_max_batch: int
    time_steps: int  # timed steps per throughput row (after 2 warm-up steps)
    cli_steps: int  # `clipforge train` steps
    cli_minutes: float  # its --time-limit
    torchrun_steps: int
    batches: tuple[int, ...]  # inference batch sizes
    embed_images: int
    cifar_images: int | None  # None: the whole CIFAR-10 test set
    compile_on_cpu: bool
    cli_rows: bool  # rows that start `clipforge ...` / torchrun processes
    limits: dict[str, float] = field(default_factory=dict)  # seconds per section


PROFILES = {
    "full": Profile("full", "ViT-B/32", "RN50", 8, 64, 4096, 10, 100, 1.0, 30, (1, 64, 256), 3000, None, True, True,
                    {"correctness": 50, "training": 270, "inference": 130, "plan": 20}),
    "quick": Profile("quick", "tiny-vit", "tiny-rn", 4, 8, 16, 2, 20, 0.5, 8, (1, 16), 200, 500, False, True,
                     {"correctness": 30, "training": 100, "inference": 80, "plan": 10}),
    "smoke": Profile("smoke", "tiny-vit-s", "tiny-rn", 2, 4, 8, 1, 3, 1.0, 3, (1, 4), 24, 64, False, False,
                     {"correctness": 30, "training": 60, "inference": 40, "plan": 15}),
}


# --- rows ----------------------------------------------------------------------------------------

class Skip(Exception):
    """A row that cannot run here (no CUDA, package missing, data absent, budget spent)."""


class CheckFailed(Exception):
    """A row that ran but whose result is outside its tolerance."""


NO_CUDA = "no CUDA"


class Rows:
    """Runs the rows of one section, appending each result to a JSONL file as it finishes (so the
    parent keeps what finished when the section runs out of time or crashes)."""

    def __init__(self, section: str, path: Path, deadline: float, cuda: bool) -> None:
        self.section, self.path, self.deadline, self.cuda = section, path, deadline, cuda
        self.limit = deadline - time.monotonic()
        self.results: dict[str, dict[str, Any]] = {}

    def plan(self, names: list[str]) -> None:
        self._append({"section": self.section, "planned": names})

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None], *, cuda_only: bool = False,
            needs_s: float = 0.0) -> dict[str, Any]:
        """Run ``fn`` as row ``name``: its dict is the row's metrics. ``needs_s``: skip the row when
        less than this is left of the section's time."""
        start = time.monotonic()
        record: dict[str, Any] = {"section": self.section, "row": name, "metrics": {}}
        try:
            if cuda_only and not self.cuda:
                raise Skip(NO_CUDA)
            if needs_s and self.remaining() < needs_s:
                raise Skip(f"section time budget spent ({self.remaining():.0f} s left, row needs ~{needs_s:.0f} s)")
            record["metrics"] = fn() or {}
            record["status"], record["detail"] = "ok", record["metrics"].pop("detail", "")
        except Skip as e:
            record["status"], record["detail"] = "skipped", str(e)
        except CheckFailed as e:
            record["status"], record["detail"] = "failed", str(e)
        except BaseException as e:  # one failing path must not stop the others
            if isinstance(e, KeyboardInterrupt):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            record["status"], record["detail"] = "failed", f"{type(e).__name__}: {first}"[:300]
            record["traceback"] = traceback.format_exc(limit=6)[-2000:]
        record["seconds"] = round(time.monotonic() - start, 3)
        self.results[name] = record
        self._append(record)
        return record


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def first_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# --- shared helpers (worker side) ----------------------------------------------------------------

def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def timed(fn: Callable[[], Any], dev: Any, reps: int, warmup: int = 1, max_s: float = 5.0) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after ``warmup`` (fewer if ``max_s`` runs out)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times: list[float] = []
    end = time.monotonic() + max_s
    while len(times) < reps and (not times or time.monotonic() < end):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def scenes(n: int, size: int = 64, split: str = "train") -> list[Any]:
    """``n`` built-in scenes (PIL image + captions), deterministic."""
    from clipforge.data import open_pairs

    src = open_pairs(f"builtin:scenes?n={n}&size={size}", split=split)
    return [src.get(i) for i in range(n)]


def captions(n: int) -> list[str]:
    return [s.captions[0] for s in scenes(n)]


def cli(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m clipforge.cli.main ARGS`` (this interpreter, this checkout's src first)."""
    return run_cmd([sys.executable, "-m", "clipforge.cli.main", *args], timeout, env)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def run_cmd(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if timeout <= 1:
        raise Skip("section time budget spent")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or child_env(),
                              start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"timed out after {timeout:.0f} s: {label(cmd)}") from None
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {first_line(proc.stderr) or first_line(proc.stdout)}")
    return proc


def label(cmd: list[str]) -> str:
    """The command's words after the interpreter (an inline ``-c`` program left out)."""
    words = cmd[3:] if len(cmd) > 2 and cmd[1] == "-c" else cmd[1:]
    return " ".join(words[:6]) + (" ..." if len(words) > 6 else "")


def random_checkpoint(arch: str, path: Path) -> Path:
    """A seeded random-init model of ``arch`` saved in clipforge's format (the weights every
    implementation compared in a section shares)."""
    import clipforge
    from clipforge.checkpoints import save_model

    if not path.exists():
        save_model(clipforge.create_model(arch, seed=0), path)
    return path


def accelerator_for(dev: Any) -> tuple[str | None, float | None]:
    """(``clipforge plan`` preset, bytes of device memory) of the CUDA device, (None, None) on CPU."""
    import torch

    if dev.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(dev)
    name, mem = props.name.upper(), float(props.total_memory)
    if "H100" in name:
        return "H100", mem
    if "A100" in name:
        return ("A100" if mem > 50e9 else "A100-40GB"), mem
    if "V100" in name:
        return ("V100" if mem > 20e9 else "V100-16GB"), mem
    return None, mem


def peak_tflops(dev: Any, compute: str, override: float | None) -> float | None:
    if override:
        return override
    from clipforge.plan import ACCELERATORS

    preset, _ = accelerator_for(dev)
    return ACCELERATORS[preset].peak_tflops.get(compute) if preset else None


# --- 1. correctness ------------------------------------------------------------------------------

def need_cli(p: Profile) -> None:
    if not p.cli_rows:
        raise Skip(f"--{p.name}: rows that start clipforge processes run with --quick and the full run")


def section_correctness(ctx: "Ctx", rows: Rows) -> None:
    import torch

    import clipforge
    from clipforge import fast
    from clipforge.checkpoints import load_model, save_model
    from clipforge.precision import autocast
    from clipforge.inference import embed_images, embed_texts, optimize_for_inference
    from clipforge.preprocess import image_transform

    p, dev = ctx.profile, ctx.dev
    variants, precisions = ("plain", "fast", "inference"), ("fp32", "amp_bf16", "amp")
    archs = (p.vit, p.rn)
    rows.plan([f"{a}/{v}/{q}" for a in archs for v in variants for q in precisions]
              + [f"{a}/{r}" for a in archs for r in ("tokenizer_preprocess", "save_on_device_load_cpu")])
    samples = scenes(p.n_parity)
    texts = [s.captions[0] for s in samples]
    for arch in archs:
        ref = clipforge.create_model(arch, seed=0).eval()
        pre = image_transform(ref.config.preprocess)
        images = torch.stack([pre(s.image) for s in samples])
        ids = clipforge.tokenize(texts)
        with torch.no_grad():
            ref_img, ref_txt = ref.encode_image(images, normalize=True), ref.encode_text(ids, normalize=True)

        def build(variant: str) -> Any:
            m = copy.deepcopy(ref).to(dev)
            if variant == "fast":
                fast.enable(m)
            elif variant == "inference":
                m = optimize_for_inference(m)
            return m.eval()

        for variant in variants:
            for prec in precisions:
                def parity(variant: str = variant, prec: str = prec) -> dict[str, Any]:
                    m = build(variant)
                    with torch.no_grad(), autocast(prec, dev):
                        img = m.encode_image(images.to(dev), normalize=True).float().cpu()
                        txt = m.encode_text(ids.to(dev), normalize=True).float().cpu()
                    out = {"max_abs_image": float((img - ref_img).abs().max()),
                           "max_abs_text": float((txt - ref_txt).abs().max()),
                           "min_cos_image": float((img * ref_img).sum(-1).min()),
                           "min_cos_text": float((txt * ref_txt).sum(-1).min())}
                    if prec == "fp32":
                        worst = max(out["max_abs_image"], out["max_abs_text"])
                        if worst > 1e-4:
                            raise CheckFailed(f"fp32 max |diff| {worst:.2e} > 1e-4 vs CPU plain")
                        out["detail"] = f"max |diff| {worst:.1e} <= 1e-4"
                    else:
                        worst = min(out["min_cos_image"], out["min_cos_text"])
                        if dev.type != "cuda":  # the bar is CUDA's; on CPU the row runs the path
                            out["detail"] = f"min cosine {worst:.5f} (CPU autocast: recorded, the 0.999 bar is for CUDA)"
                        elif worst < 0.999:
                            raise CheckFailed(f"{prec} min cosine {worst:.5f} < 0.999 vs CPU fp32")
                        else:
                            out["detail"] = f"min cosine {worst:.5f} >= 0.999"
                    return out

                rows.run(f"{arch}/{variant}/{prec}", parity, cuda_only=(prec == "amp"))

        def pipeline() -> dict[str, Any]:
            m = build("plain")
            img = embed_images(m, [s.image for s in samples], batch_size=len(samples))
            txt = embed_texts(m, texts)
            worst = max(float((img - ref_img).abs().max()), float((txt - ref_txt).abs().max()))
            if worst > 1e-4:
                raise CheckFailed(f"embed_images/embed_texts on {dev} vs CPU plain: max |diff| {worst:.2e} > 1e-4")
            return {"max_abs": worst, "detail": f"PIL -> preprocess -> {dev}; max |diff| {worst:.1e}"}

        rows.run(f"{arch}/tokenizer_preprocess", pipeline)

        def save_reload() -> dict[str, Any]:
            m = copy.deepcopy(ref).to(dev)
            path = save_model(m, ctx.work / f"saved_on_{dev.type}_{arch.replace('/', '-')}.safetensors")
            back = load_model(path).eval()
            a, b = m.state_dict(), back.state_dict()
            bad = [k for k in a if not torch.equal(a[k].cpu(), b[k])]
            if bad or set(a) != set(b):
                raise CheckFailed(f"reloaded on CPU: {len(bad)} tensors differ (first {bad[:1]})")
            with torch.no_grad():
                diff = float((back.encode_image(images, normalize=True) - ref_img).abs().max())
            if diff > 0:
                raise CheckFailed(f"reloaded model's image embeddings differ from the source's by {diff:.2e}")
            return {"tensors": len(a), "detail": f"{len(a)} tensors bit-identical"}

        rows.run(f"{arch}/save_on_device_load_cpu", save_reload)


# --- 2. training ---------------------------------------------------------------------------------

class StepBench:
    """A clipforge training step (``TrainStep`` through ``FeatureModel``, the fast paths on, as
    ``clipforge train`` builds it) over fixed tensors on the device, for throughput and memory."""

    def __init__(self, arch: str, dev: Any, precision: str) -> None:
        import torch

        import clipforge
        from clipforge import fast

        self.arch, self.dev, self.precision = arch, dev, precision
        self.model = clipforge.create_model(arch, seed=0).to(dev).train()
        fast.enable(self.model)
        self.caps = captions(64)
        self.size = self.model.image_size
        self.torch = torch

    def step_fn(self, batch: int, *, local_loss: bool = False, compiled: bool = False) -> Callable[[], Any]:
        import clipforge
        from clipforge.training import build_optimizer
        from clipforge.training.step import make_grad_scaler, make_train_step, objective_module

        torch = self.torch
        module = objective_module(self.model)
        if compiled:
            module = torch.compile(module)
        opt = build_optimizer(self.model, 1e-5, 0.1, (0.9, 0.98), 1e-6)
        step = make_train_step(self.model, module, opt, precision=self.precision,
                               scaler=make_grad_scaler(self.precision, self.dev),
                               local_loss=local_loss, gather_with_grad=local_loss)
        g = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, self.size, self.size, generator=g).to(self.dev)
        ids = clipforge.tokenize([self.caps[i % len(self.caps)] for i in range(batch)]).to(self.dev)
        self.last_step = step
        return lambda: step([(images, ids)])

    def measure(self, batch: int, reps: int, **kw: Any) -> dict[str, Any]:
        torch = self.torch
        fn = self.step_fn(batch, **kw)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        s = timed(fn, self.dev, reps, warmup=2, max_s=20)
        out = {"batch": batch, "step_s": s, "samples_per_s": batch / s}
        if self.dev.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.dev)
        return out

    def close(self) -> None:
        self.model = None
        self.release()

    def release(self) -> None:
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)
        self.last_step = None
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


def section_training(ctx: "Ctx", rows: Rows) -> None:
    import torch

    from clipforge.config import get_model_config
    from clipforge.plan import count_loss_flops, count_model_flops

    p, dev, arch = ctx.profile, ctx.dev, ctx.profile.vit
    # amp_bf16 on the GPU; on CPU fp32, what `--precision auto` picks on CPUs without fast bf16
    # (emulated bf16 products make a tiny-vit step 10x slower there)
    prec = "amp_bf16" if dev.type == "cuda" else "fp32"
    names = ["max_batch", "grad_checkpointing", "local_loss", "patch_dropout", "open_clip_step",
             "clipforge_train_cli", "torchrun_sigterm", "torchrun_resume", "torch_compile"]
    rows.plan(names)
    bench = StepBench(arch, dev, prec)
    found: dict[str, Any] = {}

    def max_batch() -> dict[str, Any]:
        b, best, tried = p.train_start_batch, None, []
        while b <= p.train_max_batch and rows.remaining() > 0.55 * rows.limit:  # the rest is for the other rows
            try:
                fn = bench.step_fn(b)
                fn()
                fn()
                sync(dev)
                best = b
                tried.append((b, "fits"))
                del fn
            except Exception as e:
                if not is_oom(e):
                    raise
                tried.append((b, "OOM"))
                bench.release()
                break
            bench.release()
            b *= 2
        if best is None:
            raise CheckFailed(f"batch {p.train_start_batch} does not fit")
        out = bench.measure(best, p.time_steps)
        cfg = get_model_config(arch)
        fl = count_model_flops(cfg, prec, fast=True)
        loss = count_loss_flops(best, best, cfg.embed_dim) / best
        out["model_flops_per_sample"] = fl.train + loss
        out["precision"] = prec
        out["tried"] = tried
        peak = peak_tflops(dev, "bf16", ctx.peak_tflops)
        out["mfu"] = out["model_flops_per_sample"] * out["samples_per_s"] / (peak * 1e12) if peak else None
        out["peak_tflops"] = peak
        found.update(out)
        bench.release()
        mem = f", peak {out['peak_memory_bytes'] / 2**30:.1f} GiB" if "peak_memory_bytes" in out else ""
        mfu = f", MFU {out['mfu']:.1%}" if out["mfu"] else ", MFU n/a (no peak FLOP/s for this device)"
        capped = "" if tried[-1][1] == "OOM" else f" (search stopped at {tried[-1][0]}, not by OOM)"
        out["detail"] = f"{prec} batch {best}{capped}: {out['samples_per_s']:.0f} samples/s{mem}{mfu}"
        return out

    rows.run("max_batch", max_batch, needs_s=20)
    batch = found.get("batch", p.train_start_batch)

    def grad_ckpt() -> dict[str, Any]:
        bench.model.set_grad_checkpointing(True)
        try:
            out = bench.measure(batch, p.time_steps)
        finally:
            bench.model.set_grad_checkpointing(False)
            bench.release()
        out["detail"] = f"batch {batch}: {out['samples_per_s']:.0f} samples/s"
        if "peak_memory_bytes" in out and "peak_memory_bytes" in found:
            out["memory_vs_off"] = out["peak_memory_bytes"] / found["peak_memory_bytes"]
            out["detail"] += f", memory x{out['memory_vs_off']:.2f} of off"
        return out

    rows.run("grad_checkpointing", grad_ckpt, needs_s=15)

    def local_loss() -> dict[str, Any]:
        b = min(batch, 64)
        losses = []
        for ll in (False, True):
            bench.step_fn(b, local_loss=ll)
            step = bench.last_step
            g = torch.Generator().manual_seed(1)
            images = torch.randn(b, 3, bench.size, bench.size, generator=g)
            ids = __import__("clipforge").tokenize([bench.caps[i % 64] for i in range(b)])
            bench.model.zero_grad(set_to_none=True)
            losses.append(step.compute_gradients([(images, ids)]))
        bench.release()
        if abs(losses[0] - losses[1]) > 1e-3 * max(1.0, abs(losses[0])):
            raise CheckFailed(f"local loss {losses[1]:.6f} != global loss {losses[0]:.6f} in one process")
        return {"loss_global": losses[0], "loss_local": losses[1],
                "detail": "one process: local = global loss (the gather runs in torchrun_* with --local-loss)"}

    rows.run("local_loss", local_loss, needs_s=10)

    def compiled() -> dict[str, Any]:
        if dev.type != "cuda" and not p.compile_on_cpu:
            raise Skip(f"--{p.name}: torch.compile takes minutes on a small CPU")
        start = time.monotonic()
        fn = bench.step_fn(batch, compiled=True)
        fn()
        sync(dev)
        compile_s = time.monotonic() - start
        s = timed(fn, dev, p.time_steps, warmup=1, max_s=20)
        bench.release()
        eager = found.get("samples_per_s")
        out = {"batch": batch, "compile_s": compile_s, "samples_per_s": batch / s,
               "vs_eager": (batch / s) / eager if eager else None}
        out["detail"] = (f"compile {compile_s:.0f} s, {batch / s:.0f} samples/s"
                         + (f" (x{out['vs_eager']:.2f} of eager)" if eager else "")
                         + "; clipforge train has no compile option: torch.compile(FeatureModel) here")
        return out


    def patch_dropout() -> dict[str, Any]:
        if not hasattr(bench.model.visual, "patch_dropout"):
            raise Skip(f"{arch}: patch dropout needs a ViT image tower")
        bench.model.visual.patch_dropout = 0.5  # what --force-patch-dropout 0.5 sets
        try:
            out = bench.measure(batch, p.time_steps)
        finally:
            bench.model.visual.patch_dropout = 0.0
            bench.release()
        eager = found.get("samples_per_s")
        out["vs_off"] = out["samples_per_s"] / eager if eager else None
        out["detail"] = (f"p 0.5, batch {batch}: {out['samples_per_s']:.0f} samples/s"
                         + (f" (x{out['vs_off']:.2f} of no dropout)" if eager else ""))
        return out

    rows.run("patch_dropout", patch_dropout, needs_s=15)

    def open_clip_step() -> dict[str, Any]:
        if importlib.util.find_spec("open_clip") is None:
            raise Skip("open_clip not importable in this environment")
        import open_clip
        from clipforge.checkpoints import convert
        from clipforge.precision import autocast

        ckpt = random_checkpoint(arch, ctx.work / "train_model.safetensors")
        dst = ctx.work / "openclip_train"
        if not dst.exists():
            convert(ckpt, dst, "openclip")
        model = open_clip.create_model(f"local-dir:{dst}").to(dev).train()
        loss_fn = open_clip.loss.ClipLoss()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
        b = batch
        import clipforge

        size = bench.size
        images = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)).to(dev)
        ids = clipforge.tokenize([bench.caps[i % 64] for i in range(b)]).to(dev)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(prec, dev):  # the precision clipforge's rows ran in
                img, txt, scale = model(images, ids)[:3]  # (+ logit_bias when the config has one)
                loss = loss_fn(img, txt, scale)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        s = timed(step, dev, p.time_steps, warmup=2, max_s=20)
        out = {"batch": b, "precision": prec, "samples_per_s": b / s}
        if dev.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
        ours = found.get("samples_per_s")
        bench.release()
        if ours:
            out["clipforge_over_open_clip"] = ours / out["samples_per_s"]
        out["detail"] = (f"batch {b}: {out['samples_per_s']:.0f} samples/s"
                         + (f"; clipforge x{out['clipforge_over_open_clip']:.2f}" if ours else ""))
        return out

    rows.run("open_clip_step", open_clip_step, needs_s=20)

    workers = str(min(8, max(1, (os.cpu_count() or 2) - 1)))
    data = "builtin:scenes?n=20000&size=64"

    def train_cli() -> dict[str, Any]:
        need_cli(p)
        out_dir = ctx.work / "train_cli"
        b = min(batch, 512)
        # leave the torchrun rows ~40% of what is left
        minutes = round(min(p.cli_minutes, max(0.25, (0.6 * rows.remaining() - 30) / 60)), 2)
        args = ["train", "--model", arch, "--data", data, "--steps", str(p.cli_steps), "--batch-size", str(b),
                "--precision", prec, "--device", str(dev), "--out", str(out_dir), "--save-every", "0",
                "--log-every", "5", "--warmup", "10", "--workers", workers, "--no-progress",
                "--time-limit", str(minutes)]
        if dev.type == "cpu":
            args += ["--threads", str(max(1, torch.get_num_threads()))]
        code = ("import sys, json, torch\nfrom clipforge.cli.main import main\nrc = main(sys.argv[1:])\n"
                "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None\n"
                "print('PEAK_MEMORY', json.dumps(peak))\nsys.exit(rc)\n")
        start = time.monotonic()
        proc = run_cmd([sys.executable, "-c", code, *args], min(rows.remaining() - 5, minutes * 60 + 90))
        wall = time.monotonic() - start
        summary = json.loads((out_dir / "summary.json").read_text())
        peak = json.loads(proc.stdout.rsplit("PEAK_MEMORY", 1)[1].split("\n")[0]) if "PEAK_MEMORY" in proc.stdout else None
        if summary["status"] not in ("completed", "time_limit"):
            raise CheckFailed(f"summary status {summary['status']!r}")
        out = {"batch": b, "steps_done": summary["steps_done"], "status": summary["status"],
               "samples_per_s": summary["samples_per_s_median"], "final_loss": summary["final_loss"],
               "wall_s": wall, "peak_memory_bytes": peak, "workers": int(workers)}
        out["detail"] = (f"{summary['steps_done']} steps at batch {b} ({summary['status']}): "
                         f"{summary['samples_per_s_median'] or 0:.0f} samples/s incl. data loading")
        return out

    rows.run("clipforge_train_cli", train_cli, needs_s=30 if dev.type == "cuda" else 15)

    run_dir = ctx.work / "torchrun"
    base = ["train", "--model", arch, "--data", data, "--batch-size", str(min(batch, 64)),
            "--precision", prec, "--device", "auto", "--save-every", "0", "--log-every", "1", "--warmup", "2",
            "--workers", "1", "--no-progress", "--local-loss", "--gather-with-grad"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "-m", "clipforge.cli.main"]

    def torchrun_sigterm() -> dict[str, Any]:
        need_cli(p)
        args = base + ["--steps", str(p.torchrun_steps), "--out", str(run_dir)]
        if dev.type == "cpu":
            args += ["--threads", str(max(1, torch.get_num_threads()))]
        budget = min(rows.remaining() - 10, 150)
        if budget < 5:
            raise Skip(f"section time budget spent ({rows.remaining():.0f} s left)")
        log_path = ctx.work / "torchrun_sigterm.log"  # a file, not a pipe nobody reads while it runs
        with open(log_path, "w") as log:
            proc = subprocess.Popen(launcher + args, env=child_env(), start_new_session=True,
                                    stdout=log, stderr=subprocess.STDOUT)
        metrics = run_dir / "metrics.jsonl"
        want = max(1, p.torchrun_steps // 3)
        deadline = time.monotonic() + budget
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and sum(1 for ln in metrics.read_text().splitlines() if '"loss"' in ln) >= want:
                    break
                time.sleep(0.2)
            if proc.poll() is not None:
                raise CheckFailed(f"torchrun ended (exit {proc.returncode}) before SIGTERM: "
                                  f"{first_line(log_path.read_text())}")
            if time.monotonic() >= deadline:
                raise CheckFailed(f"no {want} logged steps before the row's time ran out")
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        summary = json.loads((run_dir / "summary.json").read_text())
        from clipforge.training import list_checkpoints

        ckpts = list_checkpoints(run_dir)
        if summary["status"] != "interrupted" or not ckpts:
            raise CheckFailed(f"after SIGTERM: status {summary['status']!r}, {len(ckpts)} checkpoints "
                              f"(torchrun exit {proc.returncode}: {first_line(log_path.read_text())})")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        return {"steps_done": summary["steps_done"], "exit_code": proc.returncode, "backend": backend,
                "detail": f"{backend}, 1 process, --local-loss --gather-with-grad: stopped at step "
                          f"{summary['steps_done']} with a checkpoint"}

    first = rows.run("torchrun_sigterm", torchrun_sigterm, needs_s=40 if dev.type == "cuda" else 20)

    def torchrun_resume() -> dict[str, Any]:
        if first["status"] != "ok":
            raise Skip("torchrun_sigterm did not leave an interrupted run")
        args = ["train", "--resume", str(run_dir), "--no-progress", "--workers", "1"]
        run_cmd(launcher + args, min(rows.remaining() - 2, 150))
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary["status"] != "completed" or summary["steps_done"] != p.torchrun_steps:
            raise CheckFailed(f"resumed run: status {summary['status']!r}, steps {summary['steps_done']}/{p.torchrun_steps}")
        return {"steps_done": summary["steps_done"], "resumed_from": first["metrics"]["steps_done"],
                "detail": f"resumed at step {first['metrics']['steps_done']}, finished {summary['steps_done']} steps"}

    rows.run("torchrun_resume", torchrun_resume, needs_s=15)
    # last: compiling takes a minute or more, and the rows above matter more
    rows.run("torch_compile", compiled, needs_s=90 if dev.type == "cuda" else 30)
    bench.close()


# --- 3. inference --------------------------------------------------------------------------------

def section_inference(ctx: "Ctx", rows: Rows) -> None:
    import numpy as np
    import torch

    import clipforge
    from clipforge.checkpoints import convert
    from clipforge.loading import load_for_inference

    p, dev, arch = ctx.profile, ctx.dev, ctx.profile.vit
    precisions, top = ("fp32", "bf16", "fp16"), max(p.batches)
    names = [f"encode/{q}/b{b}" for q in precisions for b in p.batches]
    names += [f"{lib}/{q}/b{top}" for lib in ("open_clip", "transformers") for q in precisions]
    names += ["compile", "embed_cli", "zeroshot_cifar10", "serve_one_query"]
    rows.plan(names)
    ckpt = random_checkpoint(arch, ctx.work / "model.safetensors")
    caps = captions(64)
    ours: dict[str, Any] = {}
    fp32_ref: dict[str, Any] = {}

    def inputs(b: int, size: int) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(b)
        return (torch.randn(b, 3, size, size, generator=g).to(dev),
                clipforge.tokenize([caps[i % len(caps)] for i in range(b)]).to(dev))

    def throughput(enc_img: Callable[[Any], Any], enc_txt: Callable[[Any], Any], b: int, size: int) -> dict[str, Any]:
        images, ids = inputs(b, size)
        with torch.inference_mode():
            ti = timed(lambda: enc_img(images), dev, max(2, p.time_steps), warmup=1, max_s=3)
            tt = timed(lambda: enc_txt(ids), dev, max(2, p.time_steps), warmup=1, max_s=3)
            img = torch.nn.functional.normalize(enc_img(images).float(), dim=-1).cpu()
            txt = torch.nn.functional.normalize(enc_txt(ids).float(), dim=-1).cpu()
        return {"batch": b, "images_per_s": b / ti, "texts_per_s": b / tt, "_img": img, "_txt": txt}

    def compare(out: dict[str, Any], key: tuple[int, int], prec: str) -> None:
        img, txt = out.pop("_img"), out.pop("_txt")
        if prec == "fp32" and key not in fp32_ref:
            fp32_ref[key] = (img, txt)
            return
        if key in fp32_ref:
            ri, rt = fp32_ref[key]
            out["min_cos_vs_clipforge_fp32"] = float(min((img * ri).sum(-1).min(), (txt * rt).sum(-1).min()))
            out["max_abs_vs_clipforge_fp32"] = float(max((img - ri).abs().max(), (txt - rt).abs().max()))

    for prec in precisions:
        for b in p.batches:
            def encode(prec: str = prec, b: int = b) -> dict[str, Any]:
                model = load_for_inference(str(ckpt), device=str(dev), precision=prec)[0]
                out = throughput(lambda x: model.encode_image(x), lambda t: model.encode_text(t), b, model.image_size)
                compare(out, (b, 0), prec)
                ours[(prec, b)] = out
                if prec != "fp32" and out.get("min_cos_vs_clipforge_fp32", 1.0) < 0.99:
                    raise CheckFailed(f"{prec} cosine {out['min_cos_vs_clipforge_fp32']:.4f} < 0.99 vs fp32")
                out["detail"] = f"{out['images_per_s']:.0f} img/s, {out['texts_per_s']:.0f} txt/s"
                return out

            rows.run(f"encode/{prec}/b{b}", encode, cuda_only=(prec == "fp16"), needs_s=3)

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def peer(lib: str, prec: str) -> dict[str, Any]:
        if prec == "fp16" and dev.type != "cuda":
            raise Skip(NO_CUDA)
        module = "open_clip" if lib == "open_clip" else "transformers"
        if importlib.util.find_spec(module) is None:
            raise Skip(f"{module} not importable in this environment")
        dt = dtypes[prec]
        if lib == "open_clip":
            import open_clip

            dst = ctx.work / "openclip"
            if not dst.exists():
                convert(ckpt, dst, "openclip")
            model = open_clip.create_model(f"local-dir:{dst}").to(dev, dt).eval()
            size = model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            enc_img = lambda x: model.encode_image(x.to(dt))
            enc_txt = lambda t: model.encode_text(t)
        else:
            from transformers import CLIPModel

            dst = ctx.work / "hf"
            if not dst.exists():
                convert(ckpt, dst, "hf")
            model = CLIPModel.from_pretrained(str(dst), torch_dtype=dt).to(dev).eval()
            size = model.config.vision_config.image_size
            enc_img = lambda x: _features(model.get_image_features(pixel_values=x.to(dt)))
            enc_txt = lambda t: _features(model.get_text_features(input_ids=t))
        out = throughput(enc_img, enc_txt, top, size)
        compare(out, (top, 0), "peer")
        mine = ours.get((prec, top))
        if mine:
            out["clipforge_images_ratio"] = mine["images_per_s"] / out["images_per_s"]
            out["clipforge_texts_ratio"] = mine["texts_per_s"] / out["texts_per_s"]
        if prec == "fp32" and out.get("max_abs_vs_clipforge_fp32", 0) > 1e-4:
            raise CheckFailed(f"{lib} fp32 embeddings differ from clipforge's by {out['max_abs_vs_clipforge_fp32']:.2e} > 1e-4")
        out["detail"] = (f"{out['images_per_s']:.0f} img/s, {out['texts_per_s']:.0f} txt/s"
                         + (f"; clipforge x{out['clipforge_images_ratio']:.2f} img, x{out['clipforge_texts_ratio']:.2f} txt"
                            if mine else ""))
        return out

    for lib in ("open_clip", "transformers"):
        for prec in precisions:
            rows.run(f"{lib}/{prec}/b{top}", lambda lib=lib, prec=prec: peer(lib, prec), needs_s=5)

    def compiled() -> dict[str, Any]:
        if dev.type != "cuda" and not p.compile_on_cpu:
            raise Skip(f"--{p.name}: torch.compile takes minutes on a small CPU")
        from clipforge.inference import optimize_for_inference

        model = optimize_for_inference(clipforge.create_model(arch, seed=0).to(dev), compile=True)
        start = time.monotonic()
        images, ids = inputs(top, model.image_size)
        with torch.inference_mode():
            model.encode_image(images)
            model.encode_text(ids)
        sync(dev)
        compile_s = time.monotonic() - start
        out = throughput(lambda x: model.encode_image(x), lambda t: model.encode_text(t), top, model.image_size)
        compare(out, (top, 0), "compiled")
        if out.get("max_abs_vs_clipforge_fp32", 0) > 1e-3:
            raise CheckFailed(f"compiled embeddings differ from eager by {out['max_abs_vs_clipforge_fp32']:.2e}")
        mine = ours.get(("fp32", top))
        out["compile_s"] = compile_s
        out["vs_eager_images"] = out["images_per_s"] / mine["images_per_s"] if mine else None
        out["detail"] = f"compile {compile_s:.0f} s; {out['images_per_s']:.0f} img/s" + (
            f" (x{out['vs_eager_images']:.2f} of eager)" if mine else "")
        return out

    rows.run("compile", compiled, needs_s=60 if dev.type == "cuda" else 30)

    folder, emb = ctx.work / "images", ctx.work / "emb"

    def embed_cli() -> dict[str, Any]:
        need_cli(p)
        folder.mkdir(exist_ok=True)
        t0 = time.monotonic()
        for i, s in enumerate(scenes(p.embed_images, size=128, split="val")):
            s.image.save(folder / f"{i:05d}.jpg", quality=90)
        gen_s = time.monotonic() - t0
        start = time.monotonic()
        cli(["embed", "--model", str(ckpt), "--images", str(folder), "--out", str(emb), "--device", str(dev),
             "--batch-size", str(top), "--no-progress", "--json"], rows.remaining() - 2)
        wall = time.monotonic() - start
        manifest = json.loads((emb / "manifest.json").read_text())
        n = int(manifest.get("count", manifest.get("n", p.embed_images)) or p.embed_images)
        return {"images": p.embed_images, "wall_s": wall, "images_per_s_incl_startup": p.embed_images / wall,
                "generate_s": gen_s, "manifest_count": n,
                "detail": f"{p.embed_images} JPEGs in {wall:.1f} s incl. process start "
                          f"({p.embed_images / wall:.0f} img/s)"}

    embed_row = rows.run("embed_cli", embed_cli, needs_s=12)

    def zeroshot() -> dict[str, Any]:
        need_cli(p)
        src = ctx.data / "cifar10_test" / "cifar10_test.npz"
        if not src.is_file():
            raise Skip(f"{src} absent")
        path = src
        if p.cifar_images is not None:
            d = np.load(src)
            path = ctx.work / f"cifar10_first{p.cifar_images}.npz"
            np.savez(path, images=d["images"][:p.cifar_images], labels=d["labels"][:p.cifar_images],
                     class_names=d["class_names"])
        n = p.cifar_images or 10000
        out_dir = ctx.work / "zeroshot"
        start = time.monotonic()
        cli(["eval", "zeroshot", "--model", str(ckpt), "--dataset", str(path), "--device", str(dev),
             "--batch-size", str(top), "--no-cache", "--out", str(out_dir), "--no-progress"], rows.remaining() - 2)
        wall = time.monotonic() - start
        records = [json.loads(f.read_text()) for f in sorted(out_dir.rglob("*.json"))]
        acc = next((r["metrics"].get("acc1") for r in records if isinstance(r, dict) and "metrics" in r), None)
        return {"images": n, "wall_s": wall, "images_per_s_incl_startup": n / wall, "acc1_random_weights": acc,
                "detail": f"{n} CIFAR-10 images in {wall:.1f} s incl. process start (random weights: "
                          f"accuracy is chance)"}

    rows.run("zeroshot_cifar10", zeroshot, needs_s=12)

    def serve() -> dict[str, Any]:
        for mod in ("fastapi", "faiss", "httpx"):
            if importlib.util.find_spec(mod) is None:
                raise Skip(f"{mod} not importable (pip install 'clipforge[search]')")
        if embed_row["status"] != "ok":
            raise Skip("embed_cli did not produce embeddings")
        idx = ctx.work / "index"
        cli(["index", "--embeddings", str(emb), "--out", str(idx), "--no-progress"], rows.remaining() - 2)
        from fastapi.testclient import TestClient

        from clipforge.search import create_app

        model = load_for_inference(str(ckpt), device=str(dev))[0]
        with TestClient(create_app(idx, model, workers=1)) as client:
            def query(text: str) -> float:
                t = time.perf_counter()
                r = client.post("/search", json={"text": text, "k": 5})
                if r.status_code != 200:
                    raise CheckFailed(f"/search answered {r.status_code}: {r.text[:120]}")
                return time.perf_counter() - t

            cold = query("a red circle above a blue square")
            warm = statistics.median(query(f"a photo of {w} things") for w in ("three", "two", "green", "small", "large"))
        return {"first_query_ms": cold * 1e3, "query_ms_median": warm * 1e3,
                "detail": f"first query {cold * 1e3:.0f} ms, then {warm * 1e3:.1f} ms (in-process HTTP client)"}

    rows.run("serve_one_query", serve, needs_s=8)


def _features(x: Any) -> Any:
    """transformers >= 5 returns an output object from get_*_features; older versions a tensor."""
    import torch

    return x if isinstance(x, torch.Tensor) else x.pooler_output


# --- 4. plan vs measured -------------------------------------------------------------------------

def section_plan(ctx: "Ctx", rows: Rows) -> None:
    import torch

    p, dev, arch = ctx.profile, ctx.dev, ctx.profile.vit
    rows.plan(["flops", "memory", "largest_batch", "memory_grad_checkpointing", "step_time"])
    trained = {r["row"]: r for r in read_rows(ctx.work / "training.jsonl") if "row" in r}
    measured = trained.get("max_batch", {}).get("metrics", {})
    _, capacity = accelerator_for(dev)
    batch = measured.get("batch", p.train_start_batch)
    plan: dict[str, Any] = {}

    def flops() -> dict[str, Any]:
        from clipforge.plan import PlanConfig, make_plan

        # `clipforge plan ARCH --precision <training's> --devices 1 --global-batch B --reserve-gb 0`
        # (+ --accelerator custom --memory-gb <this GPU> --peak-tflops <its bf16 peak> on CUDA)
        cfg = PlanConfig(model=arch, precision=measured.get("precision", "amp_bf16"), devices=1, global_batch=batch, reserve_gb=0.0,
                         accelerator="custom" if capacity else "A100", memory_gb=capacity / 1e9 if capacity else None,
                         peak_tflops=(peak_tflops(dev, "bf16", ctx.peak_tflops) or 1.0) if capacity else None)
        plan.update(make_plan(cfg))
        fps = plan["flops_per_sample"]["total"]
        out = {"flops_per_sample": fps, "fast_path_flops_per_sample": plan["fast_path_flops_per_sample"]["total"],
               "batch": batch}
        if measured.get("model_flops_per_sample"):
            fast = plan["fast_path_flops_per_sample"]["total"]
            out["matches_training_count"] = abs(measured["model_flops_per_sample"] - fast) / fast < 0.01
        out["detail"] = f"{fps / 1e9:.1f} GFLOP/sample (plain), {out['fast_path_flops_per_sample'] / 1e9:.1f} (fast path)"
        return out

    rows.run("flops", flops)

    def need_measure(key: str, row: str = "max_batch") -> Any:
        m = trained.get(row, {})
        if m.get("status") != "ok" or m.get("metrics", {}).get(key) is None:
            raise Skip(f"training/{row} has no {key}")
        if not plan:
            raise Skip("plan/flops failed")
        return m["metrics"][key]

    def memory() -> dict[str, Any]:
        got = need_measure("peak_memory_bytes")
        pred = plan["memory_per_device"]["without_checkpointing"]["bytes"]["total"]
        return {"predicted_bytes": pred, "measured_bytes": got, "predicted_over_measured": pred / got,
                "detail": f"batch {batch}: predicted {pred / 2**30:.2f} GiB, measured {got / 2**30:.2f} GiB "
                          f"(x{pred / got:.2f})"}

    rows.run("memory", memory, cuda_only=True)

    def largest() -> dict[str, Any]:
        tried = need_measure("tried")
        fits = max(b for b, s in tried if s == "fits")
        oom = min((b for b, s in tried if s == "OOM"), default=None)
        pred = plan["memory_per_device"]["without_checkpointing"]["largest_micro_batch"]
        consistent = pred >= fits and (oom is None or pred < oom)
        return {"predicted": pred, "measured_fits": fits, "measured_oom": oom, "consistent": consistent,
                "detail": f"plan {pred}; measured: {fits} fits, " + (f"{oom} OOM" if oom else "no OOM reached")
                          + ("" if consistent else " (outside the measured bracket)")}

    rows.run("largest_batch", largest, cuda_only=True)

    def ckpt_memory() -> dict[str, Any]:
        got = need_measure("peak_memory_bytes", "grad_checkpointing")
        pred = plan["memory_per_device"]["with_checkpointing"]["bytes"]["total"]
        return {"predicted_bytes": pred, "measured_bytes": got, "predicted_over_measured": pred / got,
                "detail": f"predicted {pred / 2**30:.2f} GiB, measured {got / 2**30:.2f} GiB (x{pred / got:.2f})"}

    rows.run("memory_grad_checkpointing", ckpt_memory, cuda_only=True)

    def step_time() -> dict[str, Any]:
        step_s = need_measure("step_s")
        peak = peak_tflops(dev, "bf16", ctx.peak_tflops)
        if not peak:
            raise Skip(f"unknown peak FLOP/s for {torch.cuda.get_device_name(dev)}: pass --peak-tflops")
        mfu_assumed = plan["time"]["mfu"]
        pred = plan["flops_per_sample"]["total"] * batch / (peak * 1e12 * mfu_assumed)
        return {"predicted_s": pred, "measured_s": step_s, "assumed_mfu": mfu_assumed,
                "implied_mfu_plain_count": mfu_assumed * pred / step_s,
                "detail": f"plan {pred * 1e3:.0f} ms at MFU {mfu_assumed:.2f}, measured {step_s * 1e3:.0f} ms "
                          f"(plain-count MFU {mfu_assumed * pred / step_s:.1%})"}

    rows.run("step_time", step_time, cuda_only=True)


# --- driver --------------------------------------------------------------------------------------

@dataclass
class Ctx:
    profile: Profile
    dev: Any
    work: Path
    data: Path
    peak_tflops: float | None


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def worker_main(args: argparse.Namespace) -> int:
    import torch

    from clipforge.device import resolve_device

    profile = PROFILES[args.profile]
    dev = resolve_device(args.device)
    if dev.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    ctx = Ctx(profile, dev, Path(args.work), Path(args.data), args.peak_tflops)
    rows = Rows(args.worker, Path(args.work) / f"{args.worker}.jsonl", time.monotonic() + args.limit,
                dev.type == "cuda")
    {"correctness": section_correctness, "training": section_training, "inference": section_inference,
     "plan": section_plan}[args.worker](ctx, rows)
    return 0


def environment(dev_type: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "machine": platform.machine(), "cpu_count": os.cpu_count(),
                           "threads": torch.get_num_threads(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "load_average": os.getloadavg()}
    if dev_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    for mod in ("open_clip", "transformers", "faiss", "fastapi"):
        env[mod] = importlib.util.find_spec(mod) is not None
    return env


def run_section(section: str, args: argparse.Namespace, work: Path, limit: float) -> list[dict[str, Any]]:
    """Run one section's worker under ``limit`` seconds; rows it did not finish are failed (the one
    running when time ran out or the worker died) or skipped (those after it)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", section, "--profile", args.profile,
           "--device", args.device, "--work", str(work), "--data", str(args.data), "--limit", str(limit)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    why = ""
    try:
        _, err = proc.communicate(timeout=limit + 15)
        if proc.returncode != 0:
            why = f"worker exited {proc.returncode}: {first_line(err)}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        why = f"section time limit ({limit:.0f} s) reached"
    records = read_rows(work / f"{section}.jsonl")
    planned = next((r["planned"] for r in records if "planned" in r), [])
    done = {r["row"]: r for r in records if "row" in r}
    rows = [done[n] for n in planned if n in done] + [r for n, r in done.items() if n not in planned]
    missing = [n for n in planned if n not in done]
    if not planned and not done:
        rows.append({"section": section, "row": "(section)", "status": "failed",
                     "detail": why or "worker wrote no rows", "metrics": {}})
    for i, name in enumerate(missing):
        status = "failed" if i == 0 else "skipped"
        detail = (why or "worker ended early") if i == 0 else f"not reached: {why or 'worker ended early'}"
        rows.append({"section": section, "row": name, "status": status, "detail": detail, "metrics": {}})
    for r in rows:
        r["section"] = section
    print(f"  {section}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    w = max(len(f"{r['section']}/{r['row']}") for r in rows)
    print(f"{'row'.ljust(w)}  {'status':8}  {'s':>6}  detail")
    print(f"{'-' * w}  {'-' * 8}  {'-' * 6}  {'-' * 40}")
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        print(f"{(r['section'] + '/' + r['row']).ljust(w)}  {r['status']:8}  {secs:>6}  {r.get('detail', '')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto: CUDA when present)")
    ap.add_argument("--quick", action="store_true", help="tiny models and few steps (a CPU run in < 3 min)")
    ap.add_argument("--smoke", action="store_true", help="the smallest run (the test suite's smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_acceptance.json")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (CIFAR-10 test set)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 dense peak TFLOP/s of the GPU for MFU (default: clipforge plan's preset by GPU name)")
    ap.add_argument("--limit-scale", type=float, default=1.0,
                    help="multiply every section's time limit (slow or shared machines)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process on CPU")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here (default: a temp folder)")
    # worker side
    ap.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--profile", choices=tuple(PROFILES), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)

    from clipforge.device import resolve_device

    try:
        dev = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"gpu_acceptance: error: --device {args.device}: {e}", file=sys.stderr)
        return 1
    if dev.type not in ("cuda", "cpu"):
        print(f"gpu_acceptance: error: --device {args.device}: resolved to {dev.type}; use cuda or cpu", file=sys.stderr)
        return 1
    args.device = str(dev)
    args.profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    profile = PROFILES[args.profile]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"gpu_acceptance: error: --sections: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    print(f"gpu_acceptance: {args.profile} on {dev} (sections: {', '.join(sections)})", file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_acceptance_")))
        for section in SECTIONS:
            if section in sections:
                rows += run_section(section, args, work, profile.limits[section] * args.limit_scale)
    total = time.monotonic() - started
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    payload = {"benchmark": "gpu_acceptance", "profile": args.profile, "device": str(dev),
               "sections": sections, "total_seconds": total, "counts": counts,
               "limits_s": {s: profile.limits[s] * args.limit_scale for s in sections},
               "environment": environment(dev.type), "rows": rows}
    print_table(rows)
    print(f"\n{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in {total:.0f} s")
    from clipforge.utils import write_json

    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
