"""Every inference fast path gives the plain path's embeddings within 1e-4 (fp32).

The plain path is ``forward_intermediates``: every block run in full over every token, no
padding trim, no length buckets, no pooled last block, BatchNorm as its own op, contiguous
(NCHW) memory. The fast path is what users get: ``optimize_for_inference`` + ``encode_*``
under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import clipforge
from clipforge.inference import embed_texts, fold_batchnorm, optimize_for_inference
from clipforge.models.conv import fused_conv_available
from conftest import micro_config

TOL = 1e-4


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


def test_fast_image_path_matches_plain_path(plain_model):
    s = plain_model.image_size
    images = torch.randn(40, 3, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = plain_model.visual.forward_intermediates(images)["output"]
    fast_model = optimize_for_inference(copy.deepcopy(plain_model))
    with torch.inference_mode():
        fast = fast_model.encode_image(images, normalize=False)
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max() <= TOL
    if plain_model.config.vision.kind == "resnet":
        # The fast path really is different: no BatchNorm left, channels-last weights.
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_model.visual.modules())
        assert fast_model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert fast_model.visual.fused_inference == fused_conv_available()


def test_fast_text_path_matches_plain_path(plain_model):
    ids = clipforge.tokenize(_texts(100))
    with torch.no_grad():
        plain = plain_model.text.forward_intermediates(ids)["output"]
    fast_model = optimize_for_inference(copy.deepcopy(plain_model))
    fast_model.text.bucket_tokens = 300  # several length buckets
    with torch.inference_mode():
        fast = fast_model.encode_text(ids, normalize=False)
    assert (fast - plain).abs().max() <= TOL
    # The batched helper (sorted by length, normalised) agrees too.
    helper = embed_texts(fast_model, _texts(100))
    assert (helper - torch.nn.functional.normalize(plain, dim=-1)).abs().max() <= TOL


def test_pooled_last_block_matches_full_block_in_training_too():
    """The last block runs for the pooled rows only, in training as well: same loss gradients."""
    model = clipforge.create_model(micro_config("vit"), seed=0).train()
    images = torch.randn(4, 3, 32, 32)
    ids = clipforge.tokenize(["a dog", "two red cats on the beach", "a", "a small circle"])
    w_t, w_i = torch.randn(4, 32), torch.randn(4, 32)
    ((model.encode_text(ids, normalize=False) * w_t).sum()
     + (model.encode_image(images, normalize=False) * w_i).sum()).backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ((model.text.forward_intermediates(ids)["output"] * w_t).sum()
     + (model.visual.forward_intermediates(images)["output"] * w_i).sum()).backward()
    assert len(fast_grads) > 10
    for name, p in model.named_parameters():
        if name in fast_grads:
            scale = p.grad.abs().max().item()
            assert (fast_grads[name] - p.grad).abs().max() <= 1e-5 * scale + 1e-7, name


def test_fold_batchnorm_needs_eval_mode_and_blocks_saving(tmp_path):
    model = clipforge.create_model(micro_config("resnet"), seed=0)
    assert fold_batchnorm(model.visual.train()) == 0  # training-mode BatchNorm is left alone
    model.eval()
    n_pairs = len(model.visual.conv_bn_pairs())
    assert fold_batchnorm(model.visual) == n_pairs
    optimize_for_inference(model)
    with pytest.raises(ValueError, match="optimize_for_inference"):
        clipforge.save_model(model, tmp_path / "m.safetensors")


def test_shared_prompt_prefix_is_computed_once_and_exactly(monkeypatch):
    """Prompts of one template share their first tokens: the chunk computes them once."""
    model = clipforge.create_model(micro_config("vit"), seed=0).eval()
    names = ["dog", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
             "stingray", "cock", "hen", "ostrich"] * 4
    texts = [f"a bad photo of a {n}." for n in names] + [f"itap of the {n}, dark." for n in names]
    ids = clipforge.tokenize(texts)
    calls = []
    real = model.text.transformer.forward_shared_prefix

    def spy(prefix, x, pool, causal=True):
        calls.append((prefix.shape[1], x.shape[0]))
        return real(prefix, x, pool, causal)

    monkeypatch.setattr(model.text.transformer, "forward_shared_prefix", spy)
    with torch.no_grad():
        plain = model.text.forward_intermediates(ids)["output"]
    with torch.inference_mode():
        fast = torch.cat([model.encode_text(ids[:40]), model.encode_text(ids[40:])])
    assert (fast - plain).abs().max() <= TOL
    # "<sot> a bad photo of a" (6 tokens) and "<sot> it ap of the" (5) were shared.
    assert sorted(p for p, _ in calls) == [5, 6]


needs_onednn = pytest.mark.skipif(getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None
                                  or not torch.backends.mkldnn.is_available(), reason="no oneDNN linear in this torch")


@needs_onednn
def test_onednn_linear_forward_and_gradients_match_f_linear():
    from clipforge.models.linear import _OneDNNLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 48, generator=g, requires_grad=True)
    w = torch.randn(40, 48, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    upstream = torch.randn(3, 17, 40, generator=g)
    ours = _OneDNNLinear.apply(x, w, b)
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
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_packed_onednn_path_matches_plain_torch_path(kind, monkeypatch):
    """Force each backend whatever this machine's probe chose: both give the plain numbers."""
    import clipforge.inference as inference_mod
    import clipforge.models.linear as linear_mod

    model = clipforge.create_model(micro_config(kind), seed=0).eval()
    s = model.image_size
    images = torch.randn(8, 3, s, s, generator=torch.Generator().manual_seed(2))
    ids = clipforge.tokenize(_texts(50))
    monkeypatch.setattr(linear_mod, "onednn_linear_is_faster", lambda: False)
    with torch.no_grad():
        plain_i = model.visual.forward_intermediates(images)["output"]
        plain_t = model.text.forward_intermediates(ids)["output"]
    monkeypatch.setattr(linear_mod, "onednn_linear_is_faster", lambda: True)
    monkeypatch.setattr(inference_mod, "onednn_linear_is_faster", lambda: True)
    fast_model = optimize_for_inference(copy.deepcopy(model))
    assert all(m.packed is not None for m in fast_model.modules() if hasattr(m, "pack_for_inference"))
    with torch.inference_mode():
        assert (fast_model.encode_image(images) - plain_i).abs().max() <= TOL
        assert (fast_model.encode_text(ids) - plain_t).abs().max() <= TOL
    fast_model.train()  # packed weights are dropped once the model may change
    assert all(m.packed is None for m in fast_model.modules() if hasattr(m, "pack_for_inference"))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_reduced_precision_inference_stays_close(kind):
    """bf16 is opt-in (or chosen by the measured probe): embeddings agree with fp32 to ~1e-2."""
    from clipforge.models.linear import fastest_precision, matmul_speed_by_precision

    model = clipforge.create_model(micro_config(kind), seed=0).eval()
    s = model.image_size
    images = torch.randn(6, 3, s, s, generator=torch.Generator().manual_seed(4))
    texts = _texts(20)
    with torch.inference_mode():
        ref_i = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    ref_t = embed_texts(model, texts)
    low = optimize_for_inference(copy.deepcopy(model), precision="bf16")
    assert low.dtype == torch.bfloat16
    with torch.inference_mode():
        got_i = torch.nn.functional.normalize(low.encode_image(images).float(), dim=-1)
    got_t = embed_texts(low, texts)
    assert got_t.dtype == torch.float32
    assert (got_i * ref_i).sum(-1).min() > 0.99
    assert (got_t * ref_t).sum(-1).min() > 0.99
    assert fastest_precision() in ("fp32", "bf16", "fp16")
    assert set(matmul_speed_by_precision()) == {"fp32", "bf16", "fp16"}
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(model, precision="int8")


@pytest.mark.slow
def test_torch_compile_path_matches_plain_path():
    """``optimize_for_inference(compile=True)``: inductor gets plain ops (its oneDNN lowering needs
    frozen weights), and the compiled towers give the plain outputs."""
    model = clipforge.create_model(micro_config("vit"), seed=0).eval()
    images = torch.randn(4, 3, 32, 32)
    ids = clipforge.tokenize(["a dog", "two red cats on the beach", "x", "a small circle"])
    with torch.no_grad():
        plain_i = model.visual.forward_intermediates(images)["output"]
        plain_t = model.text.forward_intermediates(ids)["output"]
    fast = optimize_for_inference(copy.deepcopy(model), compile=True)
    with torch.inference_mode():
        assert (fast.encode_image(images) - plain_i).abs().max() <= TOL
        assert (fast.encode_text(ids) - plain_t).abs().max() <= TOL
