"""Rule-built hard negatives (``--hard-negatives swap``): the rules on scene and generic captions,
the NegCLIP loss against a hand computation, exactness under gradient accumulation and two Gloo
processes, and a CLI run."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import micro_config
from training.test_train_distributed import (  # the same set-up as the plain DDP test
    _compute,
    _model,
)

from clipforge.data.scenes import ScenesDataset, scene_captions
from clipforge.models import create_model
from clipforge.training import TrainConfig
from clipforge.training.distributed import DistEnv
from clipforge.training.hard_negatives import (
    COLOUR_PALETTE,
    MODES,
    CaptionTokens,
    SwapNegatives,
    TokenizeWithNegatives,
    change_count,
    match_case,
    swap_colours,
    swap_objects,
    swap_spatial,
)
from clipforge.training.loop import TokenizeCaptions, caption_tokenizer
from clipforge.training.loss import ClipLoss, contrastive_loss
from clipforge.training.step import FeatureModel


def _rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


# --- the rules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption, expected", [
    ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
    ("a blue square to the right of a red circle", "a blue square to the left of a red circle"),
    ("the green triangle is at the bottom", "the green triangle is at the top"),
    ("a yellow star above a green triangle", "a yellow star below a green triangle"),
    ("The cup is ABOVE the plate, on the Left", "The cup is BELOW the plate, on the Right"),
    ("from left to right", "from right to left"),
    ("a dog in front of a car", "a dog behind a car"),
    ("Behind the house, a cat sits under the table", "In front of the house, a cat sits over the table"),
    ("the leftmost cup", "the rightmost cup"),
    ("leftover food on a bottomless plate, overhead", "leftover food on a bottomless plate, overhead"),
])
def test_spatial_swap(caption, expected):
    assert swap_spatial(caption) == expected


@pytest.mark.parametrize("caption, expected", [  # two colours: the only pair trades places
    ("a red circle to the left of a blue square", "a blue circle to the left of a red square"),
    ("a small purple cross below a small orange circle", "a small orange cross below a small purple circle"),
    ("Red car and BLUE bus", "Blue car and RED bus"),
    ("3 cats on a gray sofa, one of them black", "3 cats on a black sofa, one of them gray"),
])
def test_colour_swap(caption, expected):
    assert swap_colours(caption, _rng()) == expected


def test_colour_replacement_with_one_colour_or_a_mere_list_reordering():
    for seed in range(30):
        got = swap_colours("two green crosses", _rng(seed))
        assert got in {f"two {c} crosses" for c in COLOUR_PALETTE if c != "green"}, got
        # swapping would only reorder the list ("a blue circle and a red circle": a true caption)
        got = swap_colours("a red circle and a blue circle", _rng(seed))
        assert got in {f"a {c} circle and a blue circle" for c in COLOUR_PALETTE if c != "red"} | \
                      {f"a red circle and a {c} circle" for c in COLOUR_PALETTE if c != "blue"}, got
        # gray is grey: never "replaced" by its own spelling
        got = swap_colours("a Gray cat", _rng(seed))
        assert got != "a Grey cat" and got != "a Gray cat" and got.split()[1][0].isupper(), got
    assert swap_colours("a redhead with a bluebird", _rng()) == "a redhead with a bluebird"


@pytest.mark.parametrize("caption, expected", [
    ("a red circle to the left of a blue square", "a red square to the left of a blue circle"),
    ("two circles and a square", "two squares and a circle"),  # each slot keeps its number
    ("Two Dogs chasing a cat", "Two Cats chasing a dog"),
    ("a man and two children", "a child and two men"),
    # star/first circle would only reorder the list ("yellow star, yellow circle"): the other circle swaps
    ("a yellow star, a yellow circle and a red circle", "a yellow circle, a yellow circle and a red star"),
    ("a red star above a red circle", "a red circle above a red star"),  # a relation: a real negative
])
def test_object_swap(caption, expected):
    assert swap_objects(caption, _rng()) == expected


def test_object_replacement_stays_in_its_group():
    shapes = {"circle", "triangle", "star", "cross", "diamond"}
    animals = {"cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear"}
    for seed in range(30):
        assert swap_objects("a photo of a blue square.", _rng(seed)) in {f"a photo of a blue {s}." for s in shapes}
        got = swap_objects("Dogs on the grass", _rng(seed))
        assert got in {match_case("Dogs", "sheep" if a == "sheep" else a + "s") + " on the grass" for a in animals}, got
    assert swap_objects("a picture of two objects.", _rng()) == "a picture of two objects."  # generic nouns stay


def test_count_change():
    for seed in range(30):
        assert change_count("one red circle", _rng(seed)) in {"two red circles", "three red circles"}
        assert change_count("a picture of three objects.", _rng(seed)) in {
            "a picture of one object.", "a picture of two objects.", "a picture of four objects."}
        assert change_count("Two small green crosses", _rng(seed)) in {"One small green cross",
                                                                       "Three small green crosses"}
        assert change_count("3 dogs", _rng(seed)) in {"1 dog", "2 dogs", "4 dogs"}
    unchanged = "at 10:30 a redhead with 2.5 apples in 1990, someone"
    assert change_count(unchanged, _rng()) == unchanged


def test_scene_captions_get_the_expected_negatives():
    neg = SwapNegatives(per_caption=3, seed=0)
    assert neg.candidates("a red circle to the left of a blue square") == [
        "a red circle to the right of a blue square",
        "a blue circle to the left of a red square",
        "a red square to the left of a blue circle"]
    assert neg.candidates("a large green triangle below a small yellow star") == [
        "a large green triangle above a small yellow star",
        "a large yellow triangle below a small green star",
        "a large green star below a small yellow triangle"]
    assert neg.candidates("a picture of two objects.") in (["a picture of one object."], ["a picture of three objects."],
                                                           ["a picture of four objects."])
    assert neg.candidates("a photo") == [] and neg("a photo") == []


def test_negatives_of_scene_captions_are_changed_unique_capped_and_in_the_scene_vocabulary():
    ds = ScenesDataset("train", n=400, seed=3)
    captions = sorted({c for i in range(len(ds)) for c in scene_captions(ds.scene(i))})
    vocab = {w for c in captions for w in c.replace(",", " ").replace(".", " ").replace(":", " ").split()}
    neg2 = SwapNegatives(per_caption=2, seed=1)
    relation_words = {"left", "right", "above", "below", "top", "bottom"}
    for cap in captions:
        cands = SwapNegatives(per_caption=3, seed=1).candidates(cap)
        assert cap not in cands and len(set(cands)) == len(cands), cap
        for n in cands:  # no word that only negatives contain (except a count past the scenes' three)
            words = set(n.replace(",", " ").replace(".", " ").replace(":", " ").split())
            assert words <= vocab | {"four"}, (cap, n, words - vocab)
        if relation_words & set(cap.split()):
            assert swap_spatial(cap) in cands, cap
        picked = neg2(cap)
        assert len(picked) == min(2, len(cands)) and all(p in cands for p in picked)
        assert picked == SwapNegatives(per_caption=2, seed=1)(cap)  # deterministic given the seed


def test_the_cap_draw_depends_on_the_seed():
    caps = [f"a {a} circle to the left of a {b} square" for a in COLOUR_PALETTE for b in COLOUR_PALETTE if a != b]
    draws = {seed: [SwapNegatives(per_caption=1, seed=seed)(c)[0] for c in caps] for seed in (0, 1)}
    assert draws[0] != draws[1]
    assert all(len(SwapNegatives(per_caption=1, seed=0)(c)) == 1 for c in caps)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="per_caption"):
        SwapNegatives(per_caption=0)
    with pytest.raises(ValueError, match="unknown rule"):
        SwapNegatives(rules=("spatial", "sizes"))
    with pytest.raises(ValueError, match="hard_negatives"):
        TrainConfig(hard_negatives="shuffle")
    with pytest.raises(ValueError, match="hard_negatives_per_caption"):
        TrainConfig(hard_negatives="swap", hard_negatives_per_caption=0)
    cfg = TrainConfig.from_dict({"hard-negatives": "swap", "hard_negatives_per_caption": "2"})
    assert cfg.hard_negatives == "swap" and cfg.hard_negatives_per_caption == 2


def test_tokenizer_lays_out_negatives_per_caption():
    caps = ["a red circle to the left of a blue square", "a photo", "two green crosses"]
    tok = caption_tokenizer(TrainConfig(hard_negatives="swap", hard_negatives_per_caption=2, seed=4), 77)
    assert isinstance(tok, TokenizeWithNegatives)
    out = tok(caps)
    plain = TokenizeCaptions(77)
    assert torch.equal(out.ids, plain(caps))
    assert out.neg_ids.shape == (3, 2, 77) and out.neg_mask.tolist() == [[True, True], [False, False], [True, True]]
    for i, cap in enumerate(caps):
        negs = SwapNegatives(2, 4)(cap)
        for c, n in enumerate(negs):
            assert torch.equal(out.neg_ids[i, c], plain([n])[0])
    assert not out.neg_ids[1].any()
    assert isinstance(caption_tokenizer(TrainConfig(), 77), TokenizeCaptions)


# --- the loss ---------------------------------------------------------------------------------------
def _hand_negclip(img, txt, neg, mask, scale: float) -> float:
    """NegCLIP written out with loops in float64: image i's softmax over all texts and its own
    present negatives; text j's softmax over all images."""
    n = len(img)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    sim = [[scale * dot(img[i], txt[j]) for j in range(n)] for i in range(n)]
    i2t = 0.0
    for i in range(n):
        denom = sum(math.exp(sim[i][j]) for j in range(n))
        denom += sum(math.exp(scale * dot(img[i], neg[i][c])) for c in range(len(neg[i])) if mask[i][c])
        i2t -= sim[i][i] - math.log(denom)
    t2i = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n))
    return (i2t / n + t2i / n) / 2


def _features(n=4, c=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
    return f(n, d), f(n, d), f(n, c, d)


def test_negclip_loss_equals_a_hand_computation():
    img, txt, neg = _features()
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True], [True, True, True]])
    neg = torch.where(mask[..., None], neg, torch.zeros_like(neg))  # absent rows are zeros, as FeatureModel makes them
    scale = torch.tensor(6.0, dtype=torch.float64)
    want = _hand_negclip(img.tolist(), txt.tolist(), neg.tolist(), mask.tolist(), 6.0)
    assert contrastive_loss(img, txt, scale, neg, mask).item() == pytest.approx(want, rel=1e-12)
    assert ClipLoss()(img, txt, scale, neg, mask).item() == pytest.approx(want, rel=1e-12)
    assert want > contrastive_loss(img, txt, scale).item()  # the negatives took probability mass
    # an absent negative counts for nothing, whatever its features
    junk = neg.clone()
    junk[1] = 1.0
    assert contrastive_loss(img, txt, scale, junk, mask).item() == pytest.approx(want, rel=1e-12)


def test_no_negatives_gives_the_plain_loss_exactly():
    img, txt, neg = _features()
    scale = torch.tensor(9.0, dtype=torch.float64)
    plain = contrastive_loss(img, txt, scale)
    empty = torch.zeros(4, 0, 5, dtype=torch.float64), torch.zeros(4, 0, dtype=torch.bool)
    assert torch.equal(contrastive_loss(img, txt, scale, *empty), plain)
    assert torch.equal(contrastive_loss(img, txt, scale, neg, torch.zeros(4, 3, dtype=torch.bool)), plain)
    with pytest.raises(ValueError, match=r"\[N, C, D\]"):
        contrastive_loss(img, txt, scale, neg[:3], torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        contrastive_loss(img, txt, scale, neg, None)


def test_gradients_reach_present_negatives_only_and_are_finite():
    img, txt, neg = _features()
    mask = torch.tensor([[True, False, False]] * 4)
    neg.requires_grad_(True)
    contrastive_loss(img, txt, torch.tensor(5.0, dtype=torch.float64), neg, mask).backward()
    assert torch.isfinite(neg.grad).all()
    assert (neg.grad[:, 0].abs().sum(-1) > 0).all() and not neg.grad[:, 1:].any()


def test_feature_model_encodes_negatives_like_captions():
    model = create_model(micro_config("vit"), seed=0).double().eval()
    caps = ["a red circle to the left of a blue square", "a photo", "two green crosses"]
    text = TokenizeWithNegatives(TokenizeCaptions(77), SwapNegatives(2, 0))(caps)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    fm = FeatureModel(model)
    with torch.no_grad():
        _, txt, _, neg = fm(images, *text)
        _, txt0, _ = fm(images, text.ids)
        each = F.normalize(model.encode_text(text.neg_ids[text.neg_mask]).float(), dim=-1)  # features are fp32
    torch.testing.assert_close(txt, txt0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(neg[text.neg_mask], each, rtol=1e-6, atol=1e-7)
    assert neg.shape == (3, 2, 32) and not neg[~text.neg_mask].any()


# --- accumulation and DDP ---------------------------------------------------------------------------
def _batch(n: int, seed: int, per_caption: int = 2) -> tuple[torch.Tensor, CaptionTokens]:
    """Random images with scene captions (some with no negative at all)."""
    ds = ScenesDataset("train", n=10_000, seed=seed)
    rng = random.Random(seed)
    caps = [rng.choice(scene_captions(ds.scene(i)) + ["a photo"]) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return images, TokenizeWithNegatives(TokenizeCaptions(77), SwapNegatives(per_caption, seed))(caps)


def _split(images: torch.Tensor, text: CaptionTokens, k: int) -> list[tuple[torch.Tensor, CaptionTokens]]:
    parts = [t.chunk(k) for t in text]
    return [(im, CaptionTokens(*(p[j] for p in parts))) for j, im in enumerate(images.chunk(k))]


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_with_negatives_equals_the_full_batch_gradient(k):
    images, text = _batch(8, seed=1)
    assert text.neg_mask.any() and not text.neg_mask.all()
    model = _model()
    full_loss, full = _compute(model, FeatureModel(model), ClipLoss(), [(images, text)])
    acc_loss, acc = _compute(model, FeatureModel(model), ClipLoss(), _split(images, text, k))
    plain_loss, plain = _compute(model, FeatureModel(model), ClipLoss(), [(images, text.ids)])
    assert acc_loss == pytest.approx(full_loss, rel=1e-10) and full_loss > plain_loss
    assert set(acc) == set(full)
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(plain["text.token_embedding.weight"], full["text.token_embedding.weight"])


WORLD, PER_RANK = 2, 4
MODES_DDP = [(False, False, 1), (False, True, 1), (True, True, 1), (False, False, 2), (True, True, 2)]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        env = DistEnv(rank=rank, world_size=WORLD)
        images, text = _batch(WORLD * PER_RANK, seed=5)
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        mine_images, mine_text = images[sl], CaptionTokens(*(t[sl] for t in text))
        results = {}
        for local, gwg, k in MODES_DDP:
            model = _model()
            ddp = torch.nn.parallel.DistributedDataParallel(FeatureModel(model))
            results[(local, gwg, k)] = _compute(model, ddp, ClipLoss(env, local, gwg), _split(mine_images, mine_text, k))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_gloo_with_negatives_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    images, text = _batch(WORLD * PER_RANK, seed=5)
    # both ranks hold captions with and without negatives, so gathering them is exercised
    assert all(text.neg_mask[r * PER_RANK:(r + 1) * PER_RANK].any() for r in range(WORLD))
    model = _model()
    ref_loss, ref = _compute(model, FeatureModel(model), ClipLoss(), [(images, text)])
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for mode in MODES_DDP:
            loss, g = res[mode]
            if not mode[0]:  # a local loss value is this rank's rows only
                assert loss == pytest.approx(ref_loss, rel=1e-9), mode
            assert set(g) == set(ref), mode
            for name in ref:
                torch.testing.assert_close(g[name], ref[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, md=mode: f"{md} {n}: {m}")


# --- the command line ---------------------------------------------------------------------------------
def test_cli_train_with_hard_negatives(tmp_path, capsys):
    from clipforge.cli.main import main
    from clipforge.cli.train import add_train_arguments

    model_json = tmp_path / "micro.json"
    model_json.write_text(micro_config("vit").to_json())
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_json), "--data", "builtin:scenes?n=48&size=32", "--steps", "3",
                 "--batch-size", "8", "--accum-steps", "2", "--warmup", "1", "--workers", "0", "--threads", "1",
                 "--save-every", "0", "--log-every", "1", "--no-progress", "--hard-negatives", "swap",
                 "--hard-negatives-per-caption", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["hard_negatives"] == "swap" and saved["hard_negatives_per_caption"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    assert math.isfinite(summary["final_loss"]) and (out / "final.safetensors").is_file()
    import argparse

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    choices = next(a.choices for a in p._actions if a.dest == "hard_negatives")
    assert tuple(choices) == MODES
