"""The ResNet tower's two folded forms (``clipforge.fast.resnet``) fold BatchNorm the same way:
``FastResNet``'s lazy copies and ``FoldedResNet``'s in-place convs hold bit-identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import micro_config
from models.test_fast_paths import _randomise_batchnorm

import clipforge
from clipforge import fast
from clipforge.fast.resnet import conv_bn_pairs, fold_conv_bn, foldable, fused_conv_available


def _resnet_with_statistics() -> clipforge.models.CLIP:
    model = clipforge.create_model(micro_config("resnet"), seed=0).eval()
    _randomise_batchnorm(model)
    return model


def test_fold_conv_bn_computes_the_conv_then_the_batchnorm():
    model = _resnet_with_statistics()
    conv, bn = model.visual.layer1[0].conv2, model.visual.layer1[0].bn2
    x = torch.randn(2, conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not fused_conv_available(), reason="no fused oneDNN convolution in this torch")
def test_lazy_copies_and_in_place_fold_hold_the_same_bits():
    plain = _resnet_with_statistics()
    pairs = conv_bn_pairs(plain.visual)
    assert pairs and all(foldable(*p) for p in pairs)
    lazy = fast.enable(copy.deepcopy(plain), pack=True)
    folded = copy.deepcopy(plain)
    assert fast.fold_batchnorm(folded.visual) == len(pairs)
    assert not any(foldable(*p) for p in conv_bn_pairs(folded.visual))  # BatchNorms are Identity now
    s = plain.image_size
    images = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = lazy.encode_image(images)
        torch.testing.assert_close(got, plain.encode_image(images), atol=1e-4, rtol=0)
    copies = lazy.visual.packed["folded"][1]  # id(conv) -> (weight, bias) of the lazy form
    lazy_convs = [getattr(p, c) for p, c, _ in conv_bn_pairs(lazy.visual)]
    folded_convs = [getattr(p, c) for p, c, _ in conv_bn_pairs(folded.visual)]
    assert len(copies) == len(lazy_convs) == len(folded_convs)
    for conv, done in zip(lazy_convs, folded_convs):
        w, b = copies[id(conv)]
        assert torch.equal(w, done.weight) and torch.equal(b, done.bias)
