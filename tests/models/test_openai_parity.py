"""Parity with OpenAI's released model code (clip-anytorch's clip/model.py, loaded by path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.checkpoints import convert


def _openai_model_module():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-anytorch is not installed (test-only dependency)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
    mod_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules.setdefault("openai_clip_model", mod)
    mod_spec.loader.exec_module(mod)  # imports torch and numpy only
    return mod


def _openai_clip(kind: str):
    m = _openai_model_module()
    torch.manual_seed(0)
    if kind == "vit":
        model = m.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                       context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                       transformer_layers=2)
    else:
        model = m.CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
                       vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=128,
                       transformer_heads=2, transformer_layers=2)
    with torch.no_grad():  # make every parameter and BN statistic matter
        for name, p in model.named_parameters():
            if "bn" in name or "ln" in name or name.endswith("bias") or ("downsample.1" in name):
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.2 * torch.rand_like(b))
    return model.eval()


def _check_same(ref, ours, size: int) -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, size, size, generator=g)
    ids = clipforge.tokenize(["a photo of a cat", "two red squares", "", "an image " * 10])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=0)
        assert torch.allclose(ours.encode_text(ids), ref.encode_text(ids), atol=1e-5, rtol=0)
        r_logits, _ = ref(images, ids)
        o_logits, _ = ours(images, ids)
        assert torch.allclose(o_logits, r_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_openai_state_dict_loads_with_identical_outputs(tmp_path, kind):
    ref = _openai_clip(kind)
    torch.save(ref.state_dict(), tmp_path / "openai.pt")
    ours, pre = clipforge.load(tmp_path / "openai.pt")
    assert ours.config.activation == "quick_gelu"  # OpenAI's released weights use QuickGELU
    assert ours.config.vision.kind == kind
    _check_same(ref, ours, 32 if kind == "vit" else 64)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_openai_torchscript_archive_loads(tmp_path, kind, monkeypatch):
    """OpenAI distributes TorchScript archives; we read their tensors without running the code."""
    ref = _openai_clip(kind)
    size = 32 if kind == "vit" else 64
    images = torch.randn(2, 3, size, size)
    ids = clipforge.tokenize(["a dog", "a cat"])
    traced = torch.jit.trace_module(ref, {"encode_image": images, "encode_text": ids, "forward": (images, ids)},
                                    check_trace=False)
    traced.save(str(tmp_path / "ViT.pt"))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code: the default path must not call it")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    ours, _ = clipforge.load(tmp_path / "ViT.pt")
    _check_same(ref, ours, size)


def test_fp16_openai_weights_load_as_fp32(tmp_path):
    ref = _openai_clip("vit")
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "half.pt")
    ours = clipforge.load_model(tmp_path / "half.pt")
    assert ours.dtype == torch.float32
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    _check_same(ref, ours, 32)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_convert_to_openai_loads_in_openai_code(tmp_path, kind):
    ref = _openai_clip(kind)
    torch.save(ref.state_dict(), tmp_path / "src.pt")
    convert(tmp_path / "src.pt", tmp_path / "mine.safetensors", "clipforge")
    convert(tmp_path / "mine.safetensors", tmp_path / "out" / "openai.pt", "openai")
    sd = torch.load(tmp_path / "out" / "openai.pt", weights_only=True)
    m = _openai_model_module()
    rebuilt = m.build_model(dict(sd)).float().eval()  # OpenAI's own loader infers the architecture...
    rebuilt.load_state_dict(sd, strict=True)  # ...but rounds to fp16: reload the exact fp32 weights
    _check_same(rebuilt, clipforge.load_model(tmp_path / "mine.safetensors"), 32 if kind == "vit" else 64)
