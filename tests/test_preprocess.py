"""Preprocessing parity with OpenAI CLIP's torchvision pipeline, and image loading errors.

``tests/fixtures/preprocess/reference.npz`` holds the output of the real torchvision transform
(``Resize(n, BICUBIC), CenterCrop(n), convert("RGB"), ToTensor(), Normalize``) for seeded test
images in many modes; ``scripts/make_preprocess_fixtures.py`` regenerates it (needs torchvision,
which clipforge never imports). Parity is exact: max abs difference 0.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from clipforge.config import PreprocessConfig
from clipforge.preprocess import (ImageLoadError, Preprocess, center_crop, image_transform, load_image,
                                  random_resized_crop_params, resized_crop, to_tensor)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "preprocess"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
CASES: dict[str, dict] = MANIFEST["cases"]
SAME_PILLOW = MANIFEST["versions"]["Pillow"] == PIL.__version__
# With another Pillow, resampling may round differently; one 8-bit level after Normalize is
# 1/255/min(std) = 0.0146. Exactness is required whenever the fixture's Pillow is in use.
TOLERANCE = 0.0 if SAME_PILLOW else 1.0 / 255 / min(MANIFEST["std"]) + 1e-6


@pytest.fixture(scope="module")
def refs() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def ours(case: str, variant: str, n: int) -> torch.Tensor:
    img = load_image(FIXTURES / CASES[case]["file"])
    if variant == "padcrop":  # the public crop helper alone, as CenterCrop(n) without Resize
        cfg = PreprocessConfig(image_size=n)
        return to_tensor(center_crop(img, n).convert("RGB"), cfg.mean, cfg.std)
    if variant == "rcrop":  # the train transform's crop-then-resize step with fixed parameters
        cfg = PreprocessConfig(image_size=n)
        crop = resized_crop(img, *CASES[case]["rcrop_params"], n, Image.Resampling.BICUBIC)
        return to_tensor(crop.convert("RGB"), cfg.mean, cfg.std)
    if variant == "train":  # these images always take RandomResizedCrop's central fallback
        return image_transform(PreprocessConfig(image_size=n), train=True)(img, rng=random.Random(n))
    cfg = PreprocessConfig(
        image_size=n,
        resize_mode="squash" if variant == "squash" else "shortest",
        interpolation="bilinear" if variant == "bilinear" else "bicubic",
    )
    return image_transform(cfg)(img)


def test_fixture_constants_match_config():
    cfg = PreprocessConfig()
    assert cfg.mean == tuple(MANIFEST["mean"]) and cfg.std == tuple(MANIFEST["std"])
    assert cfg.interpolation == "bicubic" and cfg.resize_mode == "shortest"


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_image_decodes_like_the_reference(case):
    """load_image gives the pixels the reference was computed from (EXIF-transposed there too)."""
    meta = CASES[case]
    img = load_image(FIXTURES / meta["file"])
    assert img.mode == meta["mode"]
    digest = hashlib.sha256(img.tobytes()).hexdigest()
    if digest != meta["decoded_sha256"] and meta["format"] == "JPEG":
        pytest.skip(f"this Pillow {PIL.__version__} decodes {meta['file']} differently from the fixture's "
                    f"Pillow {MANIFEST['versions']['Pillow']} (JPEG decoders may differ)")
    assert digest == meta["decoded_sha256"], f"{meta['file']} decodes to different pixels"


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_torchvision_pipeline(case, refs):
    keys = [k for k in MANIFEST["keys"] if k.startswith(case + "/") and "/saturate/" not in k]
    assert keys, f"no reference tensors for {case}"
    if CASES[case]["format"] == "JPEG":
        img = load_image(FIXTURES / CASES[case]["file"])
        if hashlib.sha256(img.tobytes()).hexdigest() != CASES[case]["decoded_sha256"]:
            pytest.skip("JPEG decoder differs from the fixture's; parity is not comparable")
    diffs = {}
    for key in keys:
        _, variant, n = key.split("/")
        got = ours(case, variant, int(n))
        ref = torch.from_numpy(refs[key])
        assert got.shape == ref.shape == (3, int(n), int(n)) and got.dtype == torch.float32, key
        diffs[key] = (got - ref).abs().max().item()
    bad = {k: d for k, d in diffs.items() if d > TOLERANCE}
    assert not bad, (f"max abs diff vs torchvision (Pillow here {PIL.__version__}, fixture "
                     f"{MANIFEST['versions']['Pillow']}): {bad}")


def test_parity_covers_every_mode_and_variant():
    modes = {c["mode"] for c in CASES.values()}
    assert {"RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16"} <= modes
    variants = {k.split("/")[1] for k in MANIFEST["keys"]}
    assert {"eval", "squash", "bilinear", "padcrop", "saturate", "train", "rcrop"} <= variants
    sizes = {int(k.split("/")[2]) for k in MANIFEST["keys"]}
    assert {32, 64, 224} <= sizes


# --------------------------------------------------------------------------- deliberate deviations


def test_exif_orientation_is_applied():
    meta = CASES["exif_rot6_80x50"]
    assert meta["exif_orientation"] == 6
    img = load_image(FIXTURES / meta["file"])
    assert img.size == (50, 80)  # stored 80x50, displayed rotated
    with Image.open(FIXTURES / meta["file"]) as raw:
        assert raw.size == (80, 50)
        untransposed = image_transform(PreprocessConfig(image_size=32))(raw)
    assert not torch.equal(untransposed, image_transform(PreprocessConfig(image_size=32))(img))


def test_16bit_is_scaled_not_saturated(refs):
    """16-bit k*257+d (|d|<=128) must become 8-bit k; OpenAI's pipeline would clip at 255."""
    for n in (32, 64):
        got = ours("i16_60x45", "eval", n)
        assert torch.equal(got, torch.from_numpy(refs[f"i16_60x45/eval/{n}"]))
        saturated = torch.from_numpy(refs[f"i16_60x45/saturate/{n}"])
        assert (got - saturated).abs().max().item() > 1.0  # the deviation is real, not a no-op


def test_32bit_int_and_float_modes_become_8bit():
    arr = np.arange(40 * 30, dtype=np.int32).reshape(30, 40) % 256
    small_i = Image.fromarray(arr, "I")
    as_l = Image.fromarray(arr.astype(np.uint8), "L")
    pre = image_transform(PreprocessConfig(image_size=32))
    assert torch.equal(pre(small_i), pre(as_l))  # values already 0..255: taken as 8-bit
    wide_i = Image.fromarray(arr * 257, "I")  # 16-bit range in a 32-bit image: scaled like I;16
    assert torch.equal(pre(wide_i), pre(as_l))
    f = Image.fromarray(arr.astype(np.float32) / 255.0, "F")  # min-max scaled to 0..255
    assert (pre(f) - pre(as_l)).abs().max().item() <= 1.0 / 255 / min(MANIFEST["std"]) + 1e-6


# --------------------------------------------------------------------------- loading errors


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    data = (FIXTURES / "jpeg_progressive_96x72.jpg").read_bytes()
    cut = tmp_path / "cut_photo.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut_photo.jpg"):
        load_image(cut)
    with pytest.raises(ImageLoadError, match="shard-3/0007.jpg"):
        load_image(data[: len(data) // 2], name="shard-3/0007.jpg")


def test_non_image_bytes_raise_naming_the_file(tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(bogus)
    with pytest.raises(ImageLoadError, match="sample-42"):
        load_image(b"\x00\x01garbage", name="sample-42")
    with pytest.raises(ImageLoadError, match="<bytes>"):
        load_image(b"")
    with open(bogus, "rb") as f:  # file objects too
        with pytest.raises(ImageLoadError):
            load_image(f)


def test_in_memory_errors_name_the_member_not_a_repr():
    # Pillow names an in-memory file "<_io.BytesIO object at 0x...>"; the message must name the member
    with pytest.raises(ImageLoadError) as ei:
        load_image(b"\x00\x01garbage", name="shard-00003.tar:0007.jpg")
    assert "BytesIO" not in str(ei.value) and "0x" not in str(ei.value)
    assert str(ei.value).count("shard-00003.tar:0007.jpg") >= 1


def test_missing_file_raises_image_load_error(tmp_path):
    missing = tmp_path / "nope" / "missing.jpg"
    with pytest.raises(ImageLoadError, match="missing.jpg") as ei:
        load_image(missing)
    assert isinstance(ei.value, ValueError)
    with pytest.raises(ImageLoadError):
        load_image(tmp_path)  # a directory


def test_load_image_from_bytes_and_file_object():
    path = FIXTURES / "rgb_wide_97x61.png"
    a = load_image(path)
    b = load_image(path.read_bytes())
    with open(path, "rb") as f:
        c = load_image(f)
        assert not f.closed  # the caller's file object is left to the caller
    assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on the corrupt EXIF it then ignores
def test_corrupted_files_load_or_raise_image_load_error_only():
    """Random truncations and byte flips of every fixture: a clean image or ImageLoadError, nothing else."""
    rng = random.Random(5)
    pre = image_transform(PreprocessConfig(image_size=32))
    outcomes = {"ok": 0, "error": 0}
    for meta in CASES.values():
        data = (FIXTURES / meta["file"]).read_bytes()
        for trial in range(25):
            buf = bytearray(data)
            if trial % 2:
                buf = buf[: rng.randint(0, len(buf) - 1)]
            else:
                for _ in range(rng.randint(1, 8)):
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            try:
                img = load_image(bytes(buf), name=f"{meta['file']}#{trial}")
            except ImageLoadError as e:
                assert f"{meta['file']}#{trial}" in str(e)
                outcomes["error"] += 1
                continue
            assert pre(img).shape == (3, 32, 32)
            outcomes["ok"] += 1
    assert outcomes["error"] > 50 and outcomes["ok"] > 10, outcomes


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("case", ["rgb_square_64", "rgb_small_20x27", "p_transparent_60x80", "i16_60x45",
                                  "cmyk_88x64", "la_70x50"])
def test_train_transform_shape_and_seeded_determinism(case):
    img = load_image(FIXTURES / CASES[case]["file"])
    before = img.tobytes()
    pre = image_transform(PreprocessConfig(image_size=32), train=True)
    a = pre(img, rng=random.Random(0))
    b = pre(img, rng=random.Random(0))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    others = [pre(img, rng=random.Random(s)) for s in range(1, 6)]
    assert any(not torch.equal(a, o) for o in others)  # it is random across seeds
    assert img.tobytes() == before  # input untouched


def test_random_resized_crop_params_follow_torchvision_rule():
    rng = random.Random(123)
    for _ in range(300):
        width, height = rng.randint(1, 400), rng.randint(1, 400)
        top, left, h, w = random_resized_crop_params(width, height, rng)
        assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width
        aspect_ok = 3 / 4 <= width / height <= 4 / 3
        if aspect_ok and min(width, height) >= 20:  # a draw fits: 90-100% of the area, aspect 3:4..4:3
            assert 0.85 <= (h * w) / (height * width) <= 1.0 + 0.1
    # Outside 3:4..4:3 at scale >= 0.9 no draw fits: torchvision's central crop at the clamped ratio.
    assert random_resized_crop_params(160, 90, random.Random(0)) == (0, 20, 90, 120)
    assert random_resized_crop_params(90, 160, random.Random(0)) == (20, 0, 120, 90)


def test_squash_keeps_whole_image():
    """Squash resizes both sides to n (no crop): a left-edge stripe must survive it."""
    arr = np.full((40, 120, 3), 255, np.uint8)
    arr[:, :10] = 0  # black stripe on the far left: cropped away by centre crop, kept by squash
    img = Image.fromarray(arr)
    squash = image_transform(PreprocessConfig(image_size=32, resize_mode="squash"))(img)
    crop = image_transform(PreprocessConfig(image_size=32))(img)
    assert squash.shape == crop.shape == (3, 32, 32)
    assert squash[:, :, 0].max() < 0  # black (normalised) at the left edge
    assert crop[:, :, 0].min() > 1  # white: the stripe was cropped away


def test_bilinear_differs_from_bicubic():
    img = load_image(FIXTURES / "rgb_wide_97x61.png")
    a = image_transform(PreprocessConfig(image_size=32))(img)
    b = image_transform(PreprocessConfig(image_size=32, interpolation="bilinear"))(img)
    assert not torch.equal(a, b)


def test_preprocess_rejects_non_pil_input():
    pre = image_transform(PreprocessConfig(image_size=32))
    assert isinstance(pre, Preprocess)
    with pytest.raises(TypeError, match="PIL image"):
        pre(np.zeros((32, 32, 3), np.uint8))
    assert "eval (shortest)" in repr(pre) and "size=32" in repr(pre)
