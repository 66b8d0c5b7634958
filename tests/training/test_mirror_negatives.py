"""Image-side hard negatives (``--hard-negatives mirror``): the companions are truthful (checked
against the scene generator's own captions), a photo's flip changes only captions with left/right
words, the loader lays companions out as rows B..2B-1 with a mask, and the loss over the present
rows is exact under gradient accumulation and two Gloo processes, also combined with ``swap``."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import micro_config
from PIL import Image
from training.test_train_distributed import _compute, _model

from clipforge.data import make_pair_loader
from clipforge.data.base import PairSource, Sample
from clipforge.data.mirror import MirrorCompanions, MirroredText, scene_companion, swap_left_right
from clipforge.data.scenes import ScenesDataset, render_scene, scene_captions, swap_positions
from clipforge.preprocess import image_transform
from clipforge.training import TrainConfig
from clipforge.training.distributed import DistEnv
from clipforge.training.hard_negatives import SwapNegatives, TokenizeWithNegatives
from clipforge.training.loop import TokenizeCaptions
from clipforge.training.loss import ClipLoss, contrastive_loss
from clipforge.training.step import FeatureModel


def _sample(ds: ScenesDataset, i: int) -> Sample:
    return ds.get(i)


def test_scene_companions_are_truthful():
    ds = ScenesDataset("train", n=400, seed=0, image_size=32)
    made = 0
    for i in range(400):
        s = ds.get(i)
        spec = ds.scene(i)
        for caption in s.captions:
            comp = scene_companion(ds, s, caption)
            if comp is None:
                # only relation scenes with a spatial caption get one
                assert spec.kind != "relation" or not any(w in caption.split() for w in
                                                          ("left", "right", "above", "below", "top", "bottom"))
                continue
            made += 1
            other = swap_positions(spec)
            assert comp.caption in scene_captions(other) and comp.caption not in scene_captions(spec)
            assert caption not in scene_captions(other)  # the sample's caption is false of its companion
            a, b = other.objects  # the generator's ground truth: objects[0] is left of / above objects[1]
            assert (a.x < b.x) if other.relation == "left" else (a.y < b.y)
            assert np.array_equal(np.asarray(comp.image), np.asarray(render_scene(other, 32)))
    assert made > 100


class _Photos(PairSource):
    is_map_style = True

    def __init__(self, captions: list[str]) -> None:
        super().__init__()
        self.caps = captions
        self.num_samples = len(captions)
        self.spec = "photos"

    def get(self, i: int) -> Sample:
        a = np.zeros((8, 8, 3), np.uint8)
        a[:, :4] = 255  # bright left half
        return Sample(f"p{i}", Image.fromarray(a), [self.caps[i]], {})


def test_photo_flip_changes_only_captions_with_left_right_words():
    import random

    src = _Photos(["a dog to the LEFT of a cat", "a cup above a plate", "a red car", "the leftmost boat on the Right"])
    mirror = MirrorCompanions("skip")
    got = [mirror(src, src.get(i), src.caps[i], random.Random(0)) for i in range(4)]
    assert got[0].caption == "a dog to the RIGHT of a cat" and got[3].caption == "the rightmost boat on the Left"
    assert got[1] is None and got[2] is None  # above/below do not change under a horizontal flip
    flipped = np.asarray(got[0].image)
    assert flipped[:, 4:].min() == 255 and flipped[:, :4].max() == 0
    assert swap_left_right("leftover rights") == "leftover rights"
    # "flip": captions without such words flip their own image half the time, never their caption
    flips = [MirrorCompanions("flip")(src, src.get(2), src.caps[2], random.Random(s)) for s in range(40)]
    assert set(flips) == {"flip", None}
    with pytest.raises(ValueError, match="skip, flip"):
        MirrorCompanions("both")


def test_loader_lays_companions_out_as_masked_rows():
    ds = ScenesDataset("train", n=64, seed=0, image_size=32)
    transform = image_transform(micro_config("vit").preprocess, train=True)
    plain = make_pair_loader(ds, transform=transform, tokenize=TokenizeCaptions(77), batch_size=16, seed=3)
    loader = make_pair_loader(ds, transform=transform, tokenize=TokenizeCaptions(77), batch_size=16, seed=3,
                              companion=MirrorCompanions())
    (images0, ids0), (images, text) = next(iter(plain)), next(iter(loader))
    assert isinstance(text, MirroredText) and images.shape[0] == 32 and text.text.shape[0] == 32
    assert torch.equal(images[:16], images0) and torch.equal(text.text[:16], ids0)  # the samples are unchanged
    present = text.present
    assert present[:16].all() and present[16:].any()
    tok = TokenizeCaptions(77)
    assert not images[16:][~present[16:]].any()  # absent companions: zero images, empty captions
    assert (text.text[16:][~present[16:]] == tok([""])[0]).all()
    for j in range(16):
        if present[16 + j]:
            assert not torch.equal(text.text[16 + j], ids0[j])
    # a worker process makes the same batch (the companion function is picklable, its draws seeded)
    worker = make_pair_loader(ds, transform=transform, tokenize=TokenizeCaptions(77), batch_size=16, seed=3,
                              companion=MirrorCompanions(), num_workers=1)
    wi, wt = next(iter(worker))
    worker.close()
    assert torch.equal(wi, images) and torch.equal(wt.text, text.text) and torch.equal(wt.present, present)
    # swap and mirror together: the companions' captions get their own rule-built negatives
    both = make_pair_loader(ds, transform=transform, batch_size=16, seed=3, companion=MirrorCompanions(),
                            tokenize=TokenizeWithNegatives(tok, SwapNegatives(2, 0)))
    _, text2 = next(iter(both))
    assert torch.equal(text2.text.ids, text.text) and text2.text.neg_mask[16:][present[16:]].any()
    assert not text2.text.neg_mask[16:][~present[16:]].any()


def test_loss_over_present_rows_is_the_loss_of_those_rows():
    g = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
                for _ in range(2))
    present = torch.tensor([True, True, True, False, True, False])
    scale = torch.tensor(7.0, dtype=torch.float64)
    want = contrastive_loss(img[present], txt[present], scale)
    junk_img, junk_txt = img.clone(), txt.clone()
    junk_img[~present] = 3.0
    junk_txt[~present] = -2.0
    assert contrastive_loss(junk_img, junk_txt, scale, present=present).item() == pytest.approx(want.item(), rel=1e-12)
    assert ClipLoss()(img, txt, scale, present=present).item() == pytest.approx(want.item(), rel=1e-12)
    with pytest.raises(ValueError, match="present"):
        contrastive_loss(img, txt, scale, present=present[:4])


def _mirror_batch(n: int, seed: int, swap: bool) -> tuple[torch.Tensor, MirroredText]:
    ds = ScenesDataset("train", n=2000, seed=seed, image_size=32)
    tok = TokenizeCaptions(77)
    tokenize = TokenizeWithNegatives(tok, SwapNegatives(2, seed)) if swap else tok
    loader = make_pair_loader(ds, transform=image_transform(micro_config("vit").preprocess, train=True),
                              tokenize=tokenize, batch_size=n, seed=seed, companion=MirrorCompanions())
    images, text = next(iter(loader))
    return images.double(), text


def _split(images: torch.Tensor, text: MirroredText, k: int) -> list[tuple[torch.Tensor, MirroredText]]:
    """k micro-batches, each with its samples' rows then their companions' rows (as the loader makes them)."""
    n = images.shape[0] // 2
    rows = [torch.cat([torch.arange(n)[j::k], n + torch.arange(n)[j::k]]) for j in range(k)]
    inner = text.text
    pick = (lambda r: type(inner)(*(t[r] for t in inner))) if isinstance(inner, tuple) else (lambda r: inner[r])
    return [(images[r], MirroredText(pick(r), text.present[r])) for r in rows]


@pytest.mark.parametrize("swap", [False, True])
def test_accumulation_with_mirror_equals_the_full_batch_gradient(swap):
    images, text = _mirror_batch(8, seed=2, swap=swap)
    assert text.present[8:].any() and not text.present[8:].all()
    model = _model()
    full_loss, full = _compute(model, FeatureModel(model), ClipLoss(), [(images, text)])
    acc_loss, acc = _compute(model, FeatureModel(model), ClipLoss(), _split(images, text, 2))
    keep = text.present
    inner = text.text
    sub = type(inner)(*(t[keep] for t in inner)) if isinstance(inner, tuple) else inner[keep]
    ref_loss, ref = _compute(model, FeatureModel(model), ClipLoss(), [(images[keep], sub)])  # the present pairs only
    # features are float32 (FeatureModel), and micro-batches order the rows differently: float rounding only
    assert full_loss == pytest.approx(ref_loss, rel=1e-6) and acc_loss == pytest.approx(full_loss, rel=1e-6)
    for name in full:  # float32 features summed in another order: errors ~1e-7 of the gradient's scale
        tol = 1e-6 * float(full[name].abs().max())
        torch.testing.assert_close(full[name], ref[name], rtol=1e-5, atol=tol, msg=name)
        torch.testing.assert_close(acc[name], full[name], rtol=1e-5, atol=tol, msg=name)


WORLD, PER_RANK = 2, 4


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        env = DistEnv(rank=rank, world_size=WORLD)
        images, text = _mirror_batch(WORLD * PER_RANK, seed=5, swap=True)
        mine = _split(images, text, WORLD)[rank]
        results = {}
        for gwg, k in [(False, 1), (True, 2)]:
            model = _model()
            ddp = torch.nn.parallel.DistributedDataParallel(FeatureModel(model))
            results[(gwg, k)] = _compute(model, ddp, ClipLoss(env, False, gwg), _split(*mine, k))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_gloo_with_mirror_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    images, text = _mirror_batch(WORLD * PER_RANK, seed=5, swap=True)
    model = _model()
    ref_loss, ref = _compute(model, FeatureModel(model), ClipLoss(), [(images, text)])
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for mode, (loss, g) in res.items():
            assert loss == pytest.approx(ref_loss, rel=1e-6), mode
            for name in ref:
                torch.testing.assert_close(g[name], ref[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, md=mode: f"{md} {n}: {m}")


def test_config_and_cli_train_with_swap_and_mirror(tmp_path, capsys):
    from clipforge.cli.main import main

    assert TrainConfig(hard_negatives="mirror,swap").hard_negatives == "swap,mirror"
    with pytest.raises(ValueError, match="global loss"):
        TrainConfig(hard_negatives="mirror", local_loss=True, gather_with_grad=True)
    model_json = tmp_path / "micro.json"
    model_json.write_text(micro_config("vit").to_json())
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_json), "--data", "builtin:scenes?n=64&size=32", "--steps", "2",
                 "--batch-size", "8", "--accum-steps", "2", "--warmup", "1", "--workers", "0", "--threads", "1",
                 "--save-every", "0", "--log-every", "1", "--no-progress", "--hard-negatives", "swap,mirror",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["hard_negatives"] == "swap,mirror"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and math.isfinite(summary["final_loss"])


def test_flip_captions_on_flickr8k_change_only_left_right_words(shared_data):
    """On real captions: a caption changes exactly when it has a left/right word, and only there
    ("right" as in "right now" is swapped too: a word rule, as the swap negatives are)."""
    import csv
    import re

    with open(shared_data / "flickr8k" / "captions.tsv", encoding="utf-8") as f:
        captions = [r["caption"] for r in csv.DictReader(f, delimiter="\t")]
    partner = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
    changed = 0
    for cap in captions:
        new = swap_left_right(cap)
        words, new_words = re.findall(r"\w+|\W+", cap), re.findall(r"\w+|\W+", new)
        assert len(words) == len(new_words), cap
        spatial = False
        for a, b in zip(words, new_words):
            if a.lower() in partner:
                spatial = True
                assert b.lower() == partner[a.lower()] and b[:1].isupper() == a[:1].isupper(), (cap, new)
            else:
                assert a == b, (cap, new)
        assert (new != cap) == spatial
        changed += spatial
    assert 100 < changed < len(captions) // 100  # a few hundred of 40k captions get a companion
