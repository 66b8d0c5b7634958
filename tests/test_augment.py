"""The training augmentation options (open_clip's AugmentationCfg names): each changes the images
as specified, draws only from the per-sample ``random.Random`` (seeded: same seed, same image),
and the default equals the transform before the options existed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from clipforge.augment import AugmentationConfig, parse_key_values
from clipforge.config import PreprocessConfig
from clipforge.preprocess import Preprocess, random_resized_crop_params, resized_crop, to_tensor

CFG = PreprocessConfig(image_size=32)


def _image(seed: int = 0, size=(64, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised tensor -> uint8-scale floats [H, W, 3]."""
    m, s = torch.tensor(CFG.mean)[:, None, None], torch.tensor(CFG.std)[:, None, None]
    return ((x * s + m) * 255).permute(1, 2, 0).numpy()


def _run(img, seed=0, **aug) -> torch.Tensor:
    return Preprocess(CFG, train=True, aug=AugmentationConfig(**aug))(img, rng=random.Random(seed))


def test_default_is_the_previous_transform():
    img = _image()
    for seed in range(5):
        old = Preprocess(CFG, train=True)(img, rng=random.Random(seed))
        assert torch.equal(_run(img, seed), old)
        top, left, h, w = random_resized_crop_params(64, 48, random.Random(seed))
        expected = to_tensor(resized_crop(img, top, left, h, w, 32, Image.Resampling.BICUBIC), CFG.mean, CFG.std)
        assert torch.equal(old, expected)


@pytest.mark.parametrize("scale, ratio", [((0.1, 0.3), (0.5, 2.0)), ((0.5, 0.5), (1.0, 1.0))])
def test_scale_and_ratio_choose_the_crop(scale, ratio):
    img = _image(size=(200, 200))
    for seed in range(4):
        top, left, h, w = random_resized_crop_params(200, 200, random.Random(seed), scale, ratio)
        assert scale[0] * 0.95 <= h * w / 200 ** 2 <= scale[1] * 1.05 and ratio[0] * 0.9 <= w / h <= ratio[1] * 1.1
        expected = to_tensor(resized_crop(img, top, left, h, w, 32, Image.Resampling.BICUBIC), CFG.mean, CFG.std)
        assert torch.equal(_run(img, seed, scale=scale, ratio=ratio), expected)


def test_brightness_jitter_scales_by_a_factor_in_range():
    flat = Image.new("RGB", (40, 40), (100, 100, 100))
    factors = []
    for seed in range(20):
        out = _pixels(_run(flat, seed, color_jitter=(0.5, 0.0, 0.0, 0.0)))
        factors.append(float(out.mean()) / 100)
        assert np.ptp(out) < 1.0  # still flat
    assert all(0.49 <= f <= 1.51 for f in factors) and max(factors) - min(factors) > 0.3
    rng = random.Random(3)  # by hand: crop draws, then the jitter draw decides, then the factor
    random_resized_crop_params(40, 40, rng)
    assert rng.random() < 1.0
    f = rng.uniform(0.5, 1.5)
    expected = np.asarray(ImageEnhance.Brightness(flat.resize((32, 32))).enhance(f), dtype=np.float64)
    assert np.abs(_pixels(_run(flat, 3, color_jitter=(0.5, 0.0, 0.0, 0.0))) - expected).max() < 1e-3


def test_hue_and_saturation_jitter_change_colour():
    red = Image.new("RGB", (40, 40), (220, 20, 20))
    hue = _pixels(_run(red, 1, color_jitter=(0.0, 0.0, 0.0, 0.5)))[0, 0]
    assert not np.allclose(hue, (220, 20, 20), atol=5) and hue.max() - hue.min() > 150  # other hue, still saturated
    sat = [_pixels(_run(red, s, color_jitter=(0.0, 0.0, 1.0, 0.0)))[0, 0] for s in range(10)]
    spreads = [float(p.max() - p.min()) for p in sat]
    assert min(spreads) < 150 and all(abs(float(p.mean()) - 86.7) < 40 for p in sat)


def test_jitter_probability():
    img = _image()
    base = _run(img, 0)
    assert torch.equal(_run(img, 0, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.0), base)
    assert not torch.equal(_run(img, 0, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=1.0), base)
    assert AugmentationConfig(color_jitter=0.4).color_jitter == (0.4, 0.4, 0.4, 0.0)  # open_clip's single number


def test_grayscale_probability():
    img = _image()
    gray = _pixels(_run(img, 0, gray_scale_prob=1.0))
    assert np.abs(gray[..., 0] - gray[..., 1]).max() < 1e-3 and np.abs(gray[..., 1] - gray[..., 2]).max() < 1e-3
    colour = _pixels(_run(img, 0, gray_scale_prob=0.0))
    assert np.abs(colour[..., 0] - colour[..., 1]).max() > 10
    hits = sum(np.ptp(_pixels(_run(img, s, gray_scale_prob=0.5))[..., :3] - _pixels(_run(img, s, gray_scale_prob=0.5))[..., :1]) < 1e-3
               for s in range(40))
    assert 8 <= hits <= 32  # about half


def test_random_erasing():
    img = _image(size=(64, 64))
    for seed in range(10):
        x = _run(img, seed, re_prob=1.0)
        zero = (x == 0).all(dim=0)
        rows, cols = zero.any(dim=1).nonzero(), zero.any(dim=0).nonzero()
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert zero.sum() == area and 0.02 * 32 * 32 * 0.8 <= area <= 32 * 32 / 3 * 1.2  # one filled rectangle
        assert torch.equal(x[:, ~zero], _run(img, seed)[:, ~zero])  # the rest untouched
    assert not (_run(img, 0, re_prob=0.0) == 0).all(dim=0).any()
    two = (_run(img, 5, re_prob=1.0, re_count=2) == 0).all(dim=0).sum()
    assert two >= (_run(img, 5, re_prob=1.0) == 0).all(dim=0).sum()


def test_interpolation():
    img = _image()
    near = _pixels(_run(img, 0, interpolation="nearest"))
    source = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
    assert all(tuple(np.round(p).astype(int)) in source for p in near.reshape(-1, 3)[:50])
    assert not torch.equal(_run(img, 0, interpolation="bilinear"), _run(img, 0))


def test_seeded_and_deterministic():
    img = _image()
    full = dict(scale=(0.3, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), gray_scale_prob=0.2, re_prob=0.5)
    assert torch.equal(_run(img, 7, **full), _run(img, 7, **full))
    assert not torch.equal(_run(img, 7, **full), _run(img, 8, **full))
    state = torch.get_rng_state()
    _run(img, 7, **full)
    assert torch.equal(state, torch.get_rng_state())  # torch's generator untouched


def test_config_parsing_and_errors():
    assert parse_key_values(["scale=(0.5,1)", "re_prob=0.25", "interpolation=bilinear"]) == {
        "scale": (0.5, 1), "re_prob": 0.25, "interpolation": "bilinear"}
    aug = AugmentationConfig.from_dict({"scale": "(0.5, 1)", "color_jitter": [0.1, 0.2, 0.3]})
    assert aug.scale == (0.5, 1.0) and aug.color_jitter == (0.1, 0.2, 0.3, 0.0)
    assert aug.to_dict() == {"scale": [0.5, 1.0], "color_jitter": [0.1, 0.2, 0.3, 0.0]}
    for bad, key in [({"scal": 1}, "scal"), ({"scale": (0.5, 2)}, "scale"), ({"re_prob": 1.5}, "re_prob"),
                     ({"interpolation": "lanczos"}, "interpolation"), ({"color_jitter": (1, 2)}, "color_jitter")]:
        with pytest.raises(ValueError, match=key):
            AugmentationConfig.from_dict(bad)
    with pytest.raises(ValueError, match="key=value"):
        parse_key_values(["scale"])
