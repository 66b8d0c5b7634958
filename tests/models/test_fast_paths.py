"""Every fast path (``clipforge.fast``) gives the plain model's outputs within 1e-4 (fp32), and
gradients too; the fast layer keeps Parameters and state_dict; the kernel choice is reproducible.

The plain model (``clipforge.models``) is the reference computation: every block over every
token, torch's own kernels, BatchNorm as its own op, contiguous (NCHW) memory. The fast paths are
what users get: ``fast.enable`` (training) and ``optimize_for_inference`` + ``encode_*``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge import fast
from clipforge.fast import backend
from clipforge.fast.resnet import conv_bn_pairs, fused_conv_available
from clipforge.precision import lowest_weight_dtype
from clipforge.inference import embed_texts, optimize_for_inference
from conftest import micro_config

TOL = 1e-4
needs_onednn = pytest.mark.skipif(not fast.linear.onednn_available(), reason="no oneDNN linear in this torch")
BACKENDS = ["torch", pytest.param("onednn", marks=needs_onednn)]


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine terms, so folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


def _texts(n: int, seed: int = 3) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = ["dog", "red", "a", "circle", "on", "the", "beach", "two", "small", "cats", "photo", "of"]
    return [" ".join(words[j] for j in torch.randint(len(words), (int(k),), generator=g))
            for k in torch.randint(0, 30, (n,), generator=g)]


@pytest.fixture(params=["vit", "resnet", "tiny-rn"])
def plain_model(request):
    cfg = micro_config(request.param) if request.param != "tiny-rn" else request.param
    model = clipforge.create_model(cfg, seed=0).eval()
    _randomise_batchnorm(model)
    return model


@pytest.mark.parametrize("linear", BACKENDS)
def test_fast_image_path_matches_plain_path(plain_model, linear):
    s = plain_model.image_size
    images = torch.randn(40, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = plain_model.encode_image(images)
    with fast.using_backend(linear):
        fast_model = optimize_for_inference(copy.deepcopy(plain_model))
        if plain_model.config.vision.kind == "vit":  # several chunks of 7 images
            fast_model.visual.inference_chunk_tokens = 7 * 17
        else:
            fast_model.visual.inference_chunk_pixels = 7 * s * s
        with torch.inference_mode():
            got = fast_model.encode_image(images)
    assert got.shape == plain.shape
    assert (got - plain).abs().max() <= TOL
    packed = [m.packed for m in fast_model.visual.modules()  # (a folded ResNet computes from its own convs)
              if isinstance(m, fast.transformer.Packing) and not isinstance(m, fast.resnet.FoldedResNet)]
    assert all((p is not None) == (linear == "onednn") for p in packed)  # made by the first call
    if plain_model.config.vision.kind == "resnet":
        # The fast path really is different: no BatchNorm left, channels-last weights.
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_model.visual.modules())
        assert fast_model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert fast_model.visual.fused == fused_conv_available()


@pytest.mark.parametrize("linear", BACKENDS)
def test_fast_text_path_matches_plain_path(plain_model, linear):
    ids = clipforge.tokenize(_texts(100))
    with torch.no_grad():
        plain = plain_model.encode_text(ids)
    with fast.using_backend(linear):
        fast_model = optimize_for_inference(copy.deepcopy(plain_model))
        fast_model.text.bucket_tokens = 300  # several length buckets
        with torch.inference_mode():
            got = fast_model.encode_text(ids)
            one = fast_model.encode_text(ids[:1])  # a single row: trimmed, not bucketed
        helper = embed_texts(fast_model, _texts(100))  # sorted by length, normalised
    assert (got - plain).abs().max() <= TOL
    assert (one - plain[:1]).abs().max() <= TOL
    assert (helper - torch.nn.functional.normalize(plain, dim=-1)).abs().max() <= TOL


def _loss_grads(model: clipforge.CLIP, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    g = torch.Generator().manual_seed(7)
    w_i = torch.randn(images.shape[0], model.config.embed_dim, generator=g)
    w_t = torch.randn(ids.shape[0], model.config.embed_dim, generator=g)
    logits = model(images, ids)[0]
    ((model.encode_image(images) * w_i).sum() + (model.encode_text(ids) * w_t).sum() + logits.square().mean()
     ).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("linear", BACKENDS)
@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_training_fast_path_gives_plain_gradients(kind, linear, grad_checkpointing):
    """``fast.enable`` (what training uses): oneDNN linear with its backward, the last block for
    the pooled rows only, text padding trimmed. Same loss gradients as the plain model."""
    plain = clipforge.create_model(micro_config(kind), seed=0).train()
    model = fast.enable(copy.deepcopy(plain))
    plain.set_grad_checkpointing(grad_checkpointing)
    model.set_grad_checkpointing(grad_checkpointing)
    s = plain.image_size
    images = torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(3))
    ids = clipforge.tokenize(["a dog", "two red cats on the beach", "a", "a small circle"])
    ref = _loss_grads(plain, images, ids)
    with fast.using_backend(linear):
        got = _loss_grads(model, images, ids)
    assert set(got) == set(ref) and len(ref) > 10
    for name, g in ref.items():
        scale = g.abs().max().item()
        if name.endswith("k_proj.bias"):  # exactly 0 in exact arithmetic (softmax ignores a shift
            scale = ref[name[: -len("bias")] + "weight"].abs().max().item()  # of every score): rounding only
        assert (got[name] - g).abs().max() <= 1e-5 * scale + 1e-7, name


@needs_onednn
def test_training_fast_path_really_runs_onednn_backward(monkeypatch):
    """The gradient test above is not vacuous: with the oneDNN backend, training products go
    through ``OneDNNLinear`` (forward and backward)."""
    calls = []
    real = fast.linear.OneDNNLinear.backward

    def spy(ctx, grad):
        calls.append(grad.shape)
        return real(ctx, grad)

    monkeypatch.setattr(fast.linear.OneDNNLinear, "backward", staticmethod(spy))
    model = fast.enable(clipforge.create_model(micro_config("vit"), seed=0).train())
    with fast.using_backend("onednn"):
        _loss_grads(model, torch.randn(2, 3, 32, 32), clipforge.tokenize(["a dog", "a cat"]))
    assert len(calls) >= 4 * 4  # 4 linears per block, 2 blocks per tower, 2 towers


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_fast_layer_keeps_parameters_state_dict_and_checkpoints(tmp_path):
    plain = clipforge.create_model(micro_config("resnet"), seed=0)
    params = {n: p for n, p in plain.named_parameters()}
    saved_plain = _read(clipforge.save_model(plain, tmp_path / "plain.safetensors"))
    model = fast.enable(plain)
    assert fast.is_enabled(model) and type(model.text.transformer).__name__ == "FastTransformer"
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers keep working
    saved_fast = _read(clipforge.save_model(model, tmp_path / "fast.safetensors"))
    assert saved_fast[0] == saved_plain[0]  # the metadata (config, format)
    assert saved_fast[1].keys() == saved_plain[1].keys()
    assert all(torch.equal(saved_fast[1][k], v) for k, v in saved_plain[1].items())
    fast.disable(model)
    assert not fast.is_enabled(model) and all(p is params[n] for n, p in model.named_parameters())


def test_fold_batchnorm_needs_eval_mode_and_blocks_saving(tmp_path):
    model = clipforge.create_model(micro_config("resnet"), seed=0)
    assert fast.fold_batchnorm(model.visual.train()) == 0  # training-mode BatchNorm is left alone
    model.eval()
    n_pairs = len(conv_bn_pairs(model.visual))
    assert fast.fold_batchnorm(model.visual) == n_pairs
    assert model.visual.inference_only  # the attribute save_model checks
    optimize_for_inference(model)
    with pytest.raises(ValueError, match="optimize_for_inference"):
        clipforge.save_model(model, tmp_path / "m.safetensors")


def test_shared_prompt_prefix_is_computed_once_and_exactly(monkeypatch):
    """Prompts of one template share their first tokens: the chunk computes them once."""
    plain = clipforge.create_model(micro_config("vit"), seed=0).eval()
    model = fast.enable(copy.deepcopy(plain))
    names = ["dog", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
             "stingray", "cock", "hen", "ostrich"] * 4
    texts = [f"a bad photo of a {n}." for n in names] + [f"itap of the {n}, dark." for n in names]
    ids = clipforge.tokenize(texts)
    calls = []
    real = model.text.transformer.forward_shared_prefix

    def spy(prefix, x, pool):
        calls.append((prefix.shape[1], x.shape[0]))
        return real(prefix, x, pool)

    monkeypatch.setattr(model.text.transformer, "forward_shared_prefix", spy)
    with torch.no_grad():
        ref = plain.encode_text(ids)
    with torch.inference_mode():
        got = torch.cat([model.encode_text(ids[:40]), model.encode_text(ids[40:])])
    assert (got - ref).abs().max() <= TOL
    # "<sot> a bad photo of a" (6 tokens) and "<sot> it ap of the" (5) were shared.
    assert sorted(p for p, _ in calls) == [5, 6]


@needs_onednn
def test_onednn_linear_forward_and_gradients_match_f_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 48, generator=g, requires_grad=True)
    w = torch.randn(40, 48, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    upstream = torch.randn(3, 17, 40, generator=g)
    ours = fast.linear.OneDNNLinear.apply(x, w, b)
    (ours * upstream).sum().backward()
    mine = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = torch.nn.functional.linear(x, w, b)
    (ref * upstream).sum().backward()
    assert (ours - ref).abs().max() <= 1e-4
    for got, t in zip(mine, (x, w, b)):
        assert (got - t.grad).abs().max() <= 1e-4 * max(1.0, t.grad.abs().max().item())


@needs_onednn
def test_packed_weights_are_dropped_by_train():
    with fast.using_backend("onednn"):
        model = optimize_for_inference(clipforge.create_model(micro_config("vit"), seed=0))
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, model.image_size, model.image_size))
            model.encode_text(torch.tensor([[49406, 320, 49407]]))
    packed = [m for m in model.modules() if isinstance(m, fast.transformer.Packing)]
    assert packed and all(m.packed is not None for m in packed)
    model.train()  # the weights may change now
    assert all(m.packed is None for m in packed)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_follow_weight_changes(dtype):
    """A model loaded for inference (``enable(pack=True)``, what ``clipforge.load`` does) and then
    changed in place (an optimiser step, ``load_state_dict``) never computes with stale packs."""
    if dtype == torch.bfloat16 and not backend.onednn_bf16_available():
        pytest.skip("this CPU's oneDNN has no bf16 products: bf16 weights are not packed")
    plain = clipforge.create_model(micro_config("vit"), seed=0).eval().to(dtype)
    with fast.using_backend("onednn"):
        model = fast.enable(copy.deepcopy(plain), pack=True)
        images = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
        ids = clipforge.tokenize(["a red cube", "two blue balls on the left"])
        with torch.no_grad():
            before = model.encode_image(images.to(dtype)).float()
            model.encode_text(ids)
            assert all(m.packed for m in model.modules() if isinstance(m, fast.transformer.Packing))
            for p, q in zip(model.parameters(), plain.parameters()):  # the same in-place change to both
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(dtype)
                p.add_(noise, alpha=0.05)
                q.add_(noise, alpha=0.05)
            after, ref = model.encode_image(images.to(dtype)).float(), plain.encode_image(images.to(dtype)).float()
            after_text, ref_text = model.encode_text(ids).float(), plain.encode_text(ids).float()
    tol = TOL if dtype == torch.float32 else 3e-2 * float(ref.abs().max())
    assert (after - before).abs().max() > 10 * tol  # the change matters...
    assert (after - ref).abs().max() <= tol  # ...and the packed model follows it
    assert (after_text - ref_text).abs().max() <= (TOL if dtype == torch.float32 else 3e-2 * float(ref_text.abs().max()))


@needs_onednn
def test_enable_with_packing_leaves_training_exact():
    """``pack=True`` changes inference calls only: gradients equal those of ``enable(model)``."""
    base = clipforge.create_model(micro_config("vit"), seed=0)
    images = torch.randn(4, 3, base.image_size, base.image_size, generator=torch.Generator().manual_seed(0))
    ids = clipforge.tokenize(["a red cube", "a blue ball", "two cubes", "a green cone"])
    grads = []
    with fast.using_backend("onednn"):
        for pack in (False, True):
            model = fast.enable(copy.deepcopy(base), pack=pack).train()
            img, txt = model.encode_image(images), model.encode_text(ids)
            (model.logit_scale.exp() * img @ txt.T).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            assert not any(m.packed for m in model.modules() if isinstance(m, fast.transformer.Packing))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_reduced_precision_inference_stays_close(kind, tmp_path, monkeypatch):
    """bf16 is opt-in (or chosen by the stored probe): embeddings agree with fp32 to ~1e-2."""
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path))
    backend._precision_record.cache_clear()
    model = clipforge.create_model(micro_config(kind), seed=0).eval()
    s = model.image_size
    images = torch.randn(6, 3, s, s, generator=torch.Generator().manual_seed(4))
    texts = _texts(20)
    with torch.inference_mode():
        ref_i = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    ref_t = embed_texts(model, texts)
    low = optimize_for_inference(copy.deepcopy(model), precision="bf16")
    assert lowest_weight_dtype(low) == torch.bfloat16 and low.dtype == torch.float32  # LayerNorm etc. fp32
    with torch.inference_mode():
        got_i = torch.nn.functional.normalize(low.encode_image(images).float(), dim=-1)
    got_t = embed_texts(low, texts)
    assert got_t.dtype == torch.float32
    assert (got_i * ref_i).sum(-1).min() > 0.99
    assert (got_t * ref_t).sum(-1).min() > 0.99
    assert fast.fastest_precision() in ("fp32", "bf16", "fp16")
    assert set(fast.matmul_speed_by_precision()) == {"fp32", "bf16", "fp16"}
    stored = list(tmp_path.glob("precision-*.json"))  # measured once, written down for the machine
    assert len(stored) == 1 and json.loads(stored[0].read_text())["gflops"] == fast.matmul_speed_by_precision()
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(model, precision="int4")
    backend._precision_record.cache_clear()


# --- the kernel choice ------------------------------------------------------------------------
def test_backend_request_precedence(monkeypatch):
    monkeypatch.setenv(backend.ENV, "torch")
    assert backend.requested_backend() == ("torch", f"env {backend.ENV}") and fast.linear_backend() == "torch"
    with fast.using_backend("onednn"):
        assert backend.requested_backend() == ("onednn", "set_backend")
        assert fast.backend_record()["source"] == "set_backend"
    assert fast.linear_backend() == "torch"
    monkeypatch.setenv(backend.ENV, "mkl")
    with pytest.raises(ValueError, match=backend.ENV):
        fast.linear_backend()
    with pytest.raises(ValueError, match="backend"):
        clipforge.set_backend("fastest")


def test_machine_cache_is_measured_once_and_first_writer_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path))
    measured = []

    def measure(choice):
        def run():
            measured.append(choice)
            return {"choice": choice}
        return run

    first = backend.read_or_measure("linear", measure("torch"))
    again = backend.read_or_measure("linear", measure("onednn"))  # a later process: reads, no timing
    assert first["choice"] == again["choice"] == "torch" and measured == ["torch"]
    assert json.loads(Path(first["cache_file"]).read_text())["machine"] == backend.machine_key()

    def racing():  # another process publishes while this one measures: its file wins
        backend.cache_path("race").write_text(json.dumps({"machine": backend.machine_key(), "choice": "onednn"}))
        return {"choice": "torch"}

    assert backend.read_or_measure("race", racing)["choice"] == "onednn"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    # A file from another machine / torch version is ignored (re-measured), never trusted.
    other = tmp_path / "other"
    monkeypatch.setenv(backend.CACHE_ENV, str(other))
    other.mkdir()
    backend.cache_path("linear").write_text(json.dumps({"machine": {"cpu": "elsewhere"}, "choice": "onednn"}))
    assert backend.read_or_measure("linear", measure("torch"))["choice"] == "torch"


_CHILD = textwrap.dedent("""
    import json, sys, torch
    import clipforge
    from clipforge import fast
    sys.path.insert(0, {tests!r})
    from conftest import micro_config
    model = fast.optimize_for_inference(clipforge.create_model(micro_config("vit"), seed=0))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, 32, 32, generator=g)
    ids = clipforge.tokenize(["a photo of a dog", "two red circles on the left", "x"] * 10)
    with torch.inference_mode():
        out = torch.cat([model.encode_image(images), model.encode_text(ids)])
    torch.save(out, sys.argv[1])
    print(json.dumps(fast.backend_record()))
""")


@pytest.mark.slow
def test_two_fresh_processes_under_load_choose_alike_and_agree_bitwise(tmp_path):
    """Two processes on a fresh machine cache, started together while two busy loops load the
    CPU: one measurement wins, both use it, embeddings identical bit for bit."""
    env = {**os.environ, backend.CACHE_ENV: str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(backend.ENV, None)
    code = _CHILD.format(tests=str(Path(__file__).resolve().parents[1]))
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        kids = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"out{i}.pt")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        results = [kid.communicate(timeout=300) for kid in kids]
    finally:
        for p in load:
            p.kill()
            p.wait()
    for kid, (out, err) in zip(kids, results):
        assert kid.returncode == 0, err[-2000:]
    records = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert records[0]["linear"] == records[1]["linear"]
    assert records[0]["cache_file"] == records[1]["cache_file"] and len(list((tmp_path / "cache").glob("linear-*"))) == 1
    assert torch.equal(torch.load(tmp_path / "out0.pt"), torch.load(tmp_path / "out1.pt"))


@pytest.mark.slow
def test_torch_compile_path_matches_plain_path():
    """``optimize_for_inference(compile=True)``: inductor gets plain ops (its oneDNN lowering needs
    frozen weights), and the compiled towers give the plain outputs."""
    model = clipforge.create_model(micro_config("vit"), seed=0).eval()
    images = torch.randn(4, 3, 32, 32)
    ids = clipforge.tokenize(["a dog", "two red cats on the beach", "x", "a small circle"])
    with torch.no_grad():
        plain_i, plain_t = model.encode_image(images), model.encode_text(ids)
    compiled = optimize_for_inference(copy.deepcopy(model), compile=True)
    with torch.inference_mode():
        assert (compiled.encode_image(images) - plain_i).abs().max() <= TOL
        assert (compiled.encode_text(ids) - plain_t).abs().max() <= TOL


# --- int8 ---------------------------------------------------------------------------------------
needs_int8 = pytest.mark.skipif(not fast.linear.int8_available(), reason="no quantized CPU engine in this torch")


@needs_int8
def test_int8_linear_is_the_product_within_int8_rounding():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    got = fast.linear.int8_linear(x, fast.linear.int8_weight(w, b))
    assert got.shape == ref.shape and got.dtype == torch.float32
    rel = float((got - ref).norm() / ref.norm())
    assert 1e-5 < rel < 0.03  # quantized (not the fp32 product), and close to it


@needs_int8
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_int8_inference_stays_close_and_is_not_cached_as_fp32(kind):
    from clipforge.eval import image_tower_fingerprint, text_tower_fingerprint

    model = clipforge.create_model(micro_config(kind), seed=0).eval()
    s = model.image_size
    images = torch.randn(6, 3, s, s, generator=torch.Generator().manual_seed(4))
    ids = clipforge.tokenize(_texts(12))
    fp32 = optimize_for_inference(copy.deepcopy(model))
    int8 = optimize_for_inference(copy.deepcopy(model), precision="int8")
    assert int8.dtype == torch.float32
    with torch.inference_mode():
        ri, rt = fp32.encode_image(images), fp32.encode_text(ids)
        gi, gt = int8.encode_image(images), int8.encode_text(ids)
    cos = torch.nn.functional.cosine_similarity
    assert cos(gi, ri).min() > 0.99 and cos(gt, rt).min() > 0.99
    assert not torch.equal(gt, rt)  # the int8 products really ran
    quantized = [m for m in int8.modules() if isinstance(m, (fast.transformer.FastMLP, fast.transformer.FastAttention))]
    assert quantized and all(m.int8 for m in quantized)
    assert any(any(k.endswith("int8") for k in (m.packed or {})) for m in quantized)
    # evaluation caches key features by the weights: int8 features must not be served as fp32's
    assert text_tower_fingerprint(int8) != text_tower_fingerprint(fp32)
    if kind == "vit":
        assert image_tower_fingerprint(int8) != image_tower_fingerprint(fp32)
    with torch.enable_grad():  # a training call ignores int8: gradients flow through the fp32 weights
        int8.requires_grad_(True)
        int8.encode_text(ids).sum().backward()
    assert int8.text.transformer.resblocks[0].mlp.c_fc.weight.grad is not None


@pytest.mark.skipif(not fused_conv_available(), reason="no fused oneDNN convolution in this torch")
def test_loaded_resnet_folds_lazily_and_follows_changes():
    """``enable(pack=True)`` on a ResNet (what ``clipforge.load`` does): inference calls run folded,
    fused convolutions from copies; the tower keeps its BatchNorms (trainable, savable), and a change
    to a weight or a running statistic is followed."""
    plain = clipforge.create_model(micro_config("resnet"), seed=0).eval()
    _randomise_batchnorm(plain)
    model = fast.enable(copy.deepcopy(plain), pack=True)
    s = plain.image_size
    images = torch.randn(5, 3, s, s, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, ref = model.encode_image(images), plain.encode_image(images)
        assert (got - ref).abs().max() <= TOL
        assert model.visual.packed and "folded" in model.visual.packed
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
        for m in (model, plain):  # the same change to both: a statistic and a weight
            bn = m.visual.layer1[0].bn2
            bn.running_var.mul_(2.0)
            m.visual.conv1.weight.mul_(0.5)
        got2, ref2 = model.encode_image(images), plain.encode_image(images)
    assert (ref2 - ref).abs().max() > 10 * TOL
    assert (got2 - ref2).abs().max() <= TOL
    model.train()
    assert not model.visual.packed  # training drops the copies; the train-mode forward is the plain one


def test_packing_reset_and_int8_detection_are_public():
    """``fast.disable`` resets packing through ``Packing.reset``; feature caches detect int8 compute
    through ``fast.computes_int8`` (not by an attribute name)."""
    from clipforge.fast import computes_int8, disable
    from clipforge.fast.transformer import Packing

    model = clipforge.create_model(micro_config("vit"), seed=0)
    fast.optimize_for_inference(model, precision="int8" if fast.apply.int8_available() else "fp32")
    assert computes_int8(model) == fast.apply.int8_available()
    packers = [m for m in model.modules() if isinstance(m, Packing)]
    assert packers and all(m.pack_weights for m in packers)
    disable(model)
    assert not computes_int8(model)
    assert all("pack_weights" not in m.__dict__ and "int8" not in m.__dict__ for m in packers)


def test_save_model_refuses_a_compiled_model(tmp_path):
    from clipforge.checkpoints import save_model

    model = clipforge.create_model(micro_config("vit"), seed=0)
    model.text = torch.compile(model.text)  # what optimize_for_inference(compile=True) does (not run here)
    with pytest.raises(ValueError, match="compiled"):
        save_model(model, tmp_path / "m.safetensors")


def test_training_text_tower_computes_only_the_real_tokens(monkeypatch):
    """Training packs each caption's real tokens (padding after the end-of-text token is never a
    product row): every block's projections see sum(lengths) rows, the last block's queries one
    row per caption; and the pooled features equal the padded computation's."""
    model = fast.enable(clipforge.create_model(micro_config("vit"), seed=0).train())
    ids = clipforge.tokenize(["a dog", "two red cats on the beach at night", "a", "a small circle"])
    lengths = ids.argmax(dim=-1) + 1
    seen: list[tuple[str, int]] = []
    project = fast.transformer.FastAttention.project

    def spy(self, x, which):
        seen.append((which, x.reshape(-1, x.shape[-1]).shape[0]))
        return project(self, x, which)

    monkeypatch.setattr(fast.transformer.FastAttention, "project", spy)
    got = model.encode_text(ids)
    got.square().sum().backward()
    layers = len(model.text.transformer.resblocks)
    text_calls = seen[: 2 * (layers - 1) + 3]
    total = int(lengths.sum())
    assert total < ids.shape[0] * int(lengths.max())  # there is padding to skip
    assert text_calls == [("qkv", total), ("out", total)] * (layers - 1) + [("kv", total), ("q", 4), ("out", 4)]
    with torch.no_grad():
        padded = model.text.forward_pooled(ids[:, : int(lengths.max())])
    assert (got.detach() - padded).abs().max() <= TOL
