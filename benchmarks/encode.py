"""Encoding throughput: clipforge vs transformers.CLIPModel, OpenAI's reference code and OpenCLIP
(when importable), holding the same weights, alternating in one process.

Also clipforge's ONNX export run by ONNX Runtime (when installed). Rows: ViT-B/32 and RN50
image encoding at batch 1/16/64, text encoding of realistic captions at batch 256. Prints medians (min-max), ratios to each reference and GFLOP/s as % of the fp32
matmul peak measured in the same run (bf16 rows: % of the bf16 GEMM peak); writes
benchmarks/results/encode.json.

Rows: ``clipforge`` is ``optimize_for_inference`` (fp32); ``clipforge-bf16`` the same in bf16
where the machine's probe picks it (``precision="auto"``); ``clipforge-load`` is the model exactly
as ``clipforge.load(path)`` returns it, called as a user calls it (``model.encode_image`` under
``torch.no_grad``), no ``optimize_for_inference``.

    python benchmarks/encode.py                 # full
    python benchmarks/encode.py --quick         # 1 rep, small batches (smoke)
    python benchmarks/encode.py --models ViT-B-16-SigLIP --merge   # the native SigLIP towers

``ViT-B-16-SigLIP`` (native towers, clipforge.models.siglip): fp32 and bf16 rows
(``optimize_for_inference``), against open_clip's ``ViT-B-16-SigLIP`` (timm image tower) holding
the same weights where open_clip is importable (the interop environment); text rows are 64-token
rows (SigLIP pads every text to its context, so the cost does not depend on the words).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, alternate, environment, matmul_peak_gflops, openai_reference_module,  # noqa: E402
                     print_table, write_results)

import clipforge  # noqa: E402
from clipforge.checkpoints import hf as hf_format, openai as openai_format  # noqa: E402
from clipforge.inference import optimize_for_inference  # noqa: E402
from clipforge.fast import backend_record, fastest_precision, matmul_speed_by_precision  # noqa: E402


def cosine_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.nn.functional.normalize(a.float(), dim=-1), torch.nn.functional.normalize(b.float(), dim=-1)
    return float((a * b).sum(-1).min())


def linear_backend() -> str:
    return "onednn" if backend_record()["linear"] == "onednn" else "torch (BLAS)"


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def captions(n: int) -> list[str]:
    path = SHARED / "flickr8k" / "captions.tsv"
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        caps = [line.split("\t")[3] for line in lines]
        return [caps[i % len(caps)] for i in range(n)]
    words = "a man woman dog child red blue runs sits on the grass beach street with ball near water".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[j] for j in torch.randint(len(words), (14,), generator=g)) for _ in range(n)]


def image_gflops(model: clipforge.CLIP) -> float:
    """Forward GFLOPs per image (2 x multiply-adds of matmuls/convs) of the plain model (every
    block over every token, as the references compute it), counted with torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    s = model.image_size
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model.visual.forward_intermediates(torch.zeros(1, 3, s, s))
    return fc.get_total_flops() / 1e9


def text_gflops(model: clipforge.CLIP, ids: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model.encode_text(ids[:, : int(ids.argmax(-1).max()) + 1])  # the batch trimmed after its last EOT
    return fc.get_total_flops() / 1e9 / len(ids)


def references(name: str, model: clipforge.CLIP) -> dict[str, torch.nn.Module]:
    """Reference implementations holding the same weights as ``model``."""
    refs: dict[str, torch.nn.Module] = {}
    oa_sd = openai_format.from_native(model.state_dict())
    try:
        import open_clip

        oc_model = open_clip.create_model(name.replace("/", "-") + "-quickgelu", pretrained=None)
        oc_model.load_state_dict(oa_sd, strict=True)
        refs["openclip"] = oc_model.eval()
    except ImportError:
        print("note: open_clip not importable here (it needs torchvision); OpenCLIP rows skipped")
    mod = openai_reference_module("model")
    if mod is not None:
        ref = mod.build_model(dict(oa_sd)).float().eval()
        ref.load_state_dict(oa_sd, strict=False)
        refs["openai"] = ref
    if model.config.vision.kind == "vit":
        try:
            import transformers

            hf_cfg, _ = hf_format.config_to_hf(model.config)
            hf = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in hf_cfg.items()
                                                                 if k not in ("architectures", "model_type")}))
            hf.load_state_dict(hf_format.from_native(model.state_dict()), strict=False)
            refs["transformers"] = hf.eval()
        except ImportError:
            print("note: transformers not installed; HF rows skipped")
    return refs


class OnnxRuntimeModel:
    """clipforge's ONNX export of both towers run by ONNX Runtime (CPU, same thread count)."""

    def __init__(self, model: clipforge.CLIP, folder: Path) -> None:
        import onnxruntime as ort

        from clipforge.export import export_onnx

        paths = export_onnx(model, folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        # ORT's pool otherwise spin-waits after each run, stealing the cores from whichever
        # implementation the alternation runs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.image = ort.InferenceSession(str(paths["image"]), opts, providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(paths["text"]), opts, providers=["CPUExecutionProvider"])

    def encode_image(self, x: torch.Tensor):
        return self.image.run(None, {"pixel_values": x.numpy()})[0]

    def encode_text(self, ids: torch.Tensor):
        ids = ids[:, : int(ids.argmax(-1).max()) + 1]  # exact for the causal tower; the export allows it
        return self.text.run(None, {"input_ids": ids.numpy()})[0]


def onnx_reference(model: clipforge.CLIP, folder: Path) -> dict[str, object]:
    try:
        return {"onnxruntime": OnnxRuntimeModel(model, folder)}
    except Exception as e:  # onnx / onnxruntime missing, or the exporter failed here
        print(f"note: ONNX Runtime rows skipped ({type(e).__name__}: {e})")
        return {}


def encode_image_fn(impl: str, m: torch.nn.Module, x: torch.Tensor):
    if impl == "transformers":
        return lambda: m.get_image_features(pixel_values=x)
    return lambda: m.encode_image(x)


def encode_text_fn(impl: str, m: torch.nn.Module, ids: torch.Tensor):
    if impl == "transformers":
        return lambda: m.get_text_features(input_ids=ids)
    return lambda: m.encode_text(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B/32,RN50")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--text-batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 rep, batches 1,4, text batch 32")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other models already in benchmarks/results/encode.json")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.batches, args.text_batch = 1, "1,4", 32
    torch.manual_seed(0)
    peaks = matmul_peak_gflops()
    peak = peaks["peak"]
    print("4096^3 GEMM: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
          + f" ({torch.get_num_threads()} threads); clipforge linear backend: {linear_backend()}\n")
    rows: list[dict[str, object]] = []
    agreement: dict[str, float] = {}
    print(f"matmul probe (GFLOP/s): {matmul_speed_by_precision()}; reduced precision chosen: {fastest_precision()}")
    tmp = tempfile.mkdtemp(prefix="clipforge-bench-")
    for name in args.models.split(","):
        if name == SIGLIP:
            rows += siglip_rows(args, peaks)
            continue
        model = clipforge.create_model(name, seed=0).eval()
        fast = optimize_for_inference(clipforge.create_model(name, seed=0).eval())
        saved = clipforge.save_model(model, Path(tmp) / f"{name.replace('/', '-')}.safetensors")
        loaded = clipforge.load(saved)[0]  # as a user gets it: the fast layer applied at load
        # The reduced-precision path, where the measured probe picks one (a separate row: its
        # embeddings agree with fp32 to ~1e-2, not 1e-4; the agreement is recorded).
        low_name = fastest_precision()
        low = None
        if low_name != "fp32":
            low = optimize_for_inference(clipforge.create_model(name, seed=0).eval(), precision="auto")
        refs = references(name, model)
        refs.update(onnx_reference(model, Path(tmp) / name.replace("/", "-")))
        gf = image_gflops(model)
        s = model.image_size
        with torch.inference_mode():
            for b in [int(x) for x in args.batches.split(",")]:
                x = torch.randn(b, 3, s, s)
                fns = {"clipforge": encode_image_fn("clipforge", fast, x),
                       "clipforge-load": encode_image_fn("clipforge", loaded, x)}
                if low is not None:
                    fns[f"clipforge-{low_name}"] = encode_image_fn("clipforge", low, x)
                    agreement[f"{name} image b{b}"] = cosine_agreement(fast.encode_image(x), low.encode_image(x))
                fns.update({k: encode_image_fn(k, m, x) for k, m in refs.items()})
                t = alternate(fns, reps=args.reps, warmup=1)
                rows += _rows(f"{name} image", b, t, gf, peaks)
            if name == args.models.split(",")[0]:
                caps = captions(args.text_batch)
                ids = clipforge.tokenize(caps, truncate=True)
                gft = text_gflops(model, ids)
                fns = {"clipforge": encode_text_fn("clipforge", fast, ids),
                       "clipforge-load": encode_text_fn("clipforge", loaded, ids)}
                if low is not None:
                    fns[f"clipforge-{low_name}"] = encode_text_fn("clipforge", low, ids)
                    agreement[f"{name} text"] = cosine_agreement(fast.encode_text(ids), low.encode_text(ids))
                fns.update({k: encode_text_fn(k, m, ids) for k, m in refs.items()})
                t = alternate(fns, reps=args.reps, warmup=1)
                rows += _rows(f"{name} text (captions)", args.text_batch, t, gft, peaks)
    cols = [("row", "work", ""), ("batch", "batch", "d"), ("impl", "impl", ""), ("items_per_s", "items/s", ".1f"),
            ("range", "min-max", ""), ("ratio", "clipforge x", ".2f"), ("load_ratio", "load x", ".2f"),
            ("pct_peak", "% peak", ".0f"),
            ("peak_rss_mb", "peak RSS MB", ".0f")]
    shutil.rmtree(tmp, ignore_errors=True)
    if agreement:
        print("\nreduced precision vs fp32, min cosine of embeddings (random images; real photos below): "
              + ", ".join(f"{k} {v:.4f}" for k, v in agreement.items()))
    first = args.models.split(",")[0]
    real = real_photo_agreement(first) if first != SIGLIP else {}
    if real:
        print("on Flickr8k photos and captions: " + ", ".join(f"{k} {v:.5f}" for k, v in real.items()))
    print("\n'% peak': fp32 rows of the fp32 GEMM peak, bf16 rows of the bf16 GEMM peak; 'load x': the model "
          "as clipforge.load returns it, vs each implementation")
    late = matmul_peak_gflops()  # measured again at the end: a peak is the best the machine did
    peaks = {k: max(v, late[k]) for k, v in peaks.items()}
    for r in rows:  # % of the final peaks
        r["peak_gflops"] = peaks["bf16_peak"] if str(r["impl"]).endswith("-bf16") else peaks["peak"]
        r["pct_peak"] = 100 * float(r["items_per_s"]) * float(r["gflops_per_item"]) / r["peak_gflops"]
    print("4096^3 GEMM, best of start and end: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print_table(rows, cols)
    previous = RESULTS / "encode.json"
    if args.merge and previous.is_file():  # rows of models not measured now, from their own run
        mine = tuple(args.models.split(","))
        kept = [r for r in json.loads(previous.read_text()).get("rows", []) if not str(r["row"]).startswith(mine)]
        rows = kept + rows
    path = write_results("encode", {"env": environment(), "matmul_gflops": peaks,
                                        "linear_backend": linear_backend(), "backend": backend_record(),
                                        "precision_probe_gflops": matmul_speed_by_precision(),
                                        "reduced_precision_min_cosine_vs_fp32": agreement,
                                        "reduced_precision_min_cosine_vs_fp32_real_photos": real, "rows": rows})
    print(f"\nwrote {path}")


def _rows(work: str, batch: int, timings, gflops_per_item: float, peaks: dict[str, float]) -> list[dict[str, object]]:
    ours = timings["clipforge"].summary(batch)["items_per_s"]
    loaded = timings["clipforge-load"].summary(batch)["items_per_s"] if "clipforge-load" in timings else None
    out = []
    for impl, t in timings.items():
        s = t.summary(batch)
        peak = peaks["bf16_peak"] if impl.endswith("-bf16") else peaks["peak"]
        out.append({"row": work, "batch": batch, "impl": impl, **s,
                    "range": f"{s['items_per_s_min']:.1f}-{s['items_per_s_max']:.1f}",
                    "ratio": ours / s["items_per_s"] if impl != "clipforge" else None,
                    "load_ratio": loaded / s["items_per_s"] if loaded and not impl.startswith("clipforge") else None,
                    "gflops_per_item": gflops_per_item, "peak_gflops": peak,
                    "pct_peak": 100 * s["items_per_s"] * gflops_per_item / peak})
    return out


SIGLIP = "ViT-B-16-SigLIP"


def siglip_config() -> "clipforge.CLIPConfig":
    """open_clip's ViT-B-16-SigLIP as native towers (what checkpoints.siglip.config_from_openclip gives)."""
    from clipforge.config import CLIPConfig, PreprocessConfig, TextConfig, TokenizerConfig, VisionConfig

    return CLIPConfig(embed_dim=768, vision=VisionConfig(kind="siglip", image_size=224, width=768, layers=12, heads=12,
                                                         patch_size=16),
                      text=TextConfig(kind="siglip", context_length=64, vocab_size=32000, width=768, heads=12, layers=12),
                      activation="gelu", norm_eps=1e-6, init_logit_bias=-10.0,
                      preprocess=PreprocessConfig(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3),
                      tokenizer=TokenizerConfig(context_length=64), name=SIGLIP)


def siglip_rows(args: argparse.Namespace, peaks: dict[str, float]) -> list[dict[str, object]]:
    """Image rows at ``--batches`` and a text row at ``--text-batch``: clipforge fp32 and bf16
    (``optimize_for_inference``) and open_clip on the same weights (when importable)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.checkpoints import siglip as siglip_format

    cfg = siglip_config()
    model = clipforge.create_model(cfg, seed=0).eval().requires_grad_(False)  # (the flop counter's hooks need it)
    impls: dict[str, torch.nn.Module] = {"clipforge": optimize_for_inference(clipforge.create_model(cfg, seed=0).eval())}
    try:
        if not peaks["bf16_peak"]:
            raise ValueError("this CPU measured no bf16 GEMM throughput (no bf16 products)")
        low = optimize_for_inference(clipforge.create_model(cfg, seed=0).eval(), precision="bf16")
        with torch.inference_mode():  # this CPU may lack bf16 products (oneDNN refuses at the first call)
            low.encode_image(torch.zeros(1, 3, 224, 224, dtype=torch.bfloat16))
        impls["clipforge-bf16"] = low
    except (RuntimeError, ValueError) as e:
        print(f"note: {SIGLIP} bf16 row skipped ({e})")
    try:
        import open_clip

        oc = open_clip.create_model(SIGLIP, pretrained=None)
        oc.load_state_dict(siglip_format.from_native(model.state_dict()), strict=True)
        impls["openclip"] = oc.eval()
    except ImportError:
        print(f"note: open_clip not importable here; {SIGLIP} open_clip rows skipped")
    gf = image_gflops(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.ones(args.text_batch, 64, dtype=torch.long)  # SigLIP's pad id, caption-length content
    for i in range(args.text_batch):
        n = int(torch.randint(8, 20, (1,), generator=g))
        ids[i, :n] = torch.randint(2, 32000, (n,), generator=g)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model.encode_text(ids[:1])
    gft = fc.get_total_flops() / 1e9
    rows: list[dict[str, object]] = []
    with torch.inference_mode():
        for b in [int(x) for x in args.batches.split(",")]:
            x = torch.randn(b, 3, 224, 224)
            fns = {k: (lambda m=m, k=k: m.encode_image(x.to(torch.bfloat16) if k.endswith("bf16") else x))
                   for k, m in impls.items()}
            rows += _rows(f"{SIGLIP} image", b, alternate(fns, reps=args.reps, warmup=1), gf, peaks)
        fns = {k: (lambda m=m: m.encode_text(ids)) for k, m in impls.items()}
        rows += _rows(f"{SIGLIP} text (64 tokens)", args.text_batch, alternate(fns, reps=args.reps, warmup=1), gft, peaks)
        if "openclip" in impls:  # the rows compare equal work: features agree
            x = torch.randn(2, 3, 224, 224)
            print(f"{SIGLIP} clipforge vs open_clip, min cosine: image "
                  f"{cosine_agreement(impls['clipforge'].encode_image(x), impls['openclip'].encode_image(x)):.6f}, text "
                  f"{cosine_agreement(impls['clipforge'].encode_text(ids[:4]), impls['openclip'].encode_text(ids[:4])):.6f}")
    return rows


def real_photo_agreement(name: str, n: int = 32) -> dict[str, float]:
    """Min cosine between fp32 and the reduced-precision model's embeddings of ``n`` Flickr8k
    photos and captions (where ../shared/data has them and the probe picks a reduced precision)."""
    import io
    import tarfile

    from PIL import Image

    from clipforge.preprocess import image_transform

    folder = SHARED / "flickr8k"
    if fastest_precision() == "fp32" or not (folder / "images_128_test.tar").exists():
        return {}
    model = clipforge.create_model(name, seed=0).eval()
    pre = image_transform(model.config.preprocess)
    with tarfile.open(folder / "images_128_test.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:n]
        images = torch.stack([pre(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")) for m in members])
    ids = clipforge.tokenize(captions(n), truncate=True)
    fp32 = optimize_for_inference(clipforge.create_model(name, seed=0).eval())
    low = optimize_for_inference(model, precision="auto")
    with torch.inference_mode():
        return {"image": cosine_agreement(fp32.encode_image(images), low.encode_image(images.to(low.dtype))),
                "text": cosine_agreement(fp32.encode_text(ids), low.encode_text(ids))}


if __name__ == "__main__":
    main()
