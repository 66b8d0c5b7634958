"""Fine-tuning and WiSE-FT (issue 17, item 1): exact endpoints, the zero-shot head at step 0, learning on
a separable toy task, refusal of mismatched architectures, resumption, and the CLI on built-in scenes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipforge.checkpoints import load_model, save_model
from clipforge.cli.main import main
from clipforge.eval import ZeroShotClassifier
from clipforge.finetune import (FinetuneConfig, ImageClassifier, evaluate_positions, finetune, initial_model,
                                interpolate_state_dicts, load_classifier, open_splits, wise_ft,
                                zeroshot_head_weight)
from clipforge.models import create_model
from clipforge.preprocess import image_transform

from conftest import micro_config

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a photo of a {} thing.", "a {} picture."]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor (so -0.0 != +0.0 and NaN payloads count)."""
    return t.reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{k} differs"


def toy_npz(path, n_per_class: int = 30, size: int = 32, seed: int = 0) -> str:
    """Noisy solid-colour images, one colour per class: separable by the mean colour."""
    rng = np.random.default_rng(seed)
    cols = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [230, 220, 20]])
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    imgs = np.clip(cols[labels][:, None, None, :] + rng.normal(0, 20, (len(labels), size, size, 3)), 0, 255)
    np.savez(path, images=imgs.astype(np.uint8), labels=labels, class_names=np.array(CLASSES))
    return str(path)


@pytest.fixture
def ckpt(tmp_path, micro_vit):
    return str(save_model(micro_vit, tmp_path / "zs.safetensors"))


def _perturbed(zs: ImageClassifier, seed: int = 1) -> ImageClassifier:
    """A stand-in "fine-tuned" model: image tower and head changed, text tower not; with signed zeros."""
    ft = copy.deepcopy(zs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(ft.clip.visual.parameters()) + list(ft.head.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        ft.head.bias[0] = -0.0
        zs.head.bias[1] = -0.0
    return ft


# --- WiSE-FT ------------------------------------------------------------------------------------------

def test_wise_endpoints_reproduce_the_two_models_bitwise(micro_vit):
    zs = ImageClassifier.zeroshot(micro_vit, CLASSES, TEMPLATES)
    ft = _perturbed(zs)
    assert_bitwise_equal(wise_ft(zs, ft, 0.0).state_dict(), zs.state_dict())
    assert_bitwise_equal(wise_ft(zs, ft, 1.0).state_dict(), ft.state_dict())
    # in between: the element-wise mixture for changed tensors; the untouched text tower copied exactly
    mid = wise_ft(zs, ft, 0.3).state_dict()
    z, f = zs.state_dict(), ft.state_dict()
    name = "head.weight"
    assert torch.allclose(mid[name], 0.7 * z[name] + 0.3 * f[name], atol=1e-6)
    assert not torch.equal(mid[name], z[name]) and not torch.equal(mid[name], f[name])
    text = [k for k in z if k.startswith("clip.text.")]
    assert text
    for k in text:
        assert torch.equal(_bits(mid[k]), _bits(z[k])), k


def test_flyp_interpolation_rebuilds_the_head_from_the_mixed_text_tower(micro_vit):
    zs = ImageClassifier.zeroshot(micro_vit, CLASSES, TEMPLATES, recipe="flyp")
    ft = copy.deepcopy(zs)
    with torch.no_grad():
        ft.clip.text.text_projection.add_(0.1 * torch.randn(ft.clip.text.text_projection.shape))
    ft.refresh_head()
    assert not torch.equal(ft.head.weight, zs.head.weight)
    assert_bitwise_equal(wise_ft(zs, ft, 0.0).state_dict(), zs.state_dict())
    assert_bitwise_equal(wise_ft(zs, ft, 1.0).state_dict(), ft.state_dict())
    mid = wise_ft(zs, ft, 0.5)
    torch.testing.assert_close(mid.head.weight, zeroshot_head_weight(mid.clip, CLASSES, TEMPLATES))
    linear_mix = 0.5 * zs.head.weight + 0.5 * ft.head.weight
    assert not torch.allclose(mid.head.weight, linear_mix, atol=1e-4)  # the head is a function, not a mixture


def test_interpolation_of_mismatched_architectures_is_refused(micro_vit, micro_rn):
    vit = ImageClassifier.zeroshot(micro_vit, CLASSES, TEMPLATES)
    rn = ImageClassifier.zeroshot(micro_rn, CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="different architectures"):
        wise_ft(vit, rn, 0.5)
    fewer = ImageClassifier.zeroshot(micro_vit, CLASSES[:3], TEMPLATES)
    with pytest.raises(ValueError, match="different classes"):
        wise_ft(vit, fewer, 0.5)
    sd = vit.state_dict()
    other = dict(sd, **{"head.weight": torch.zeros(3, sd["head.weight"].shape[1])})
    with pytest.raises(ValueError, match=r"head\.weight has shape \(4, 32\).*\(3, 32\)"):
        interpolate_state_dicts(sd, other, 0.5)
    with pytest.raises(ValueError, match="only in the fine-tuned model"):
        interpolate_state_dicts({k: v for k, v in sd.items() if k != "head.bias"}, sd, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate_state_dicts(sd, sd, 1.5)


# --- the head at step 0 --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_head_at_step_zero_equals_the_zeroshot_classifier(tmp_path, kind):
    model = create_model(micro_config(kind), seed=0).eval()
    cfg = FinetuneConfig(model="unused", dataset="unused", out=str(tmp_path), steps=1)
    ft = initial_model(ImageClassifier.zeroshot(model, CLASSES, TEMPLATES), cfg).eval()
    ref = ZeroShotClassifier(model, CLASSES, TEMPLATES, use_cache=False)
    size = model.config.vision.image_size
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ft(images)
    theirs = ref.logits(images)
    assert ours.shape == theirs.shape == (6, len(CLASSES))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    # what the CE recipe trains: image tower and head; the text tower and temperature stay frozen
    assert all(p.requires_grad for p in ft.clip.visual.parameters()) and ft.head.weight.requires_grad
    assert not any(p.requires_grad for p in ft.clip.text.parameters()) and not ft.clip.logit_scale.requires_grad
    linear = initial_model(ImageClassifier.zeroshot(model, CLASSES, TEMPLATES),
                           FinetuneConfig(model="m", dataset="d", out="o", steps=1, head="linear"))
    assert not linear.head.weight.any() and not linear.head.bias.any()


# --- learning -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,lp_steps", [("ce", 0), ("ce", 3), ("flyp", 0)])
def test_few_steps_on_a_separable_task_beat_chance(tmp_path, ckpt, recipe, lp_steps):
    cfg = FinetuneConfig(model=ckpt, dataset=toy_npz(tmp_path / "toy.npz"), out=str(tmp_path / "run"), steps=15,
                         lr=1e-3, batch_size=16, recipe=recipe, lp_steps=lp_steps, wise_alphas=[], progress=False,
                         threads=1, device="cpu")
    result = finetune(cfg)
    assert result.status == "completed" and result.steps_done == 15
    splits = open_splits(cfg)
    pre = image_transform(micro_config("vit").preprocess)
    zs = ImageClassifier.zeroshot(load_model(ckpt), splits.classnames, splits.templates)
    ft = load_classifier(result.finetuned)
    chance = 1 / len(CLASSES)
    zs_acc, ft_acc = evaluate_positions(zs, splits.train, pre), evaluate_positions(ft, splits.train, pre)
    assert zs_acc <= chance + 0.1  # an untrained model: the task is not solved before fine-tuning
    assert ft_acc >= 0.75, (zs_acc, ft_acc)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 15]
    if recipe == "flyp":  # the text tower was trained, and the head rebuilt from it
        assert not torch.equal(ft.clip.text.text_projection, zs.clip.text.text_projection)
    else:
        assert torch.equal(ft.clip.text.text_projection, zs.clip.text.text_projection)
        assert lines[-1]["train_acc"] > lines[0]["train_acc"] or lines[0]["train_acc"] == 1.0


def test_lp_steps_train_the_head_alone(tmp_path, ckpt):
    """LP-FT's first phase: the image tower (BatchNorm statistics included) is left as it was."""
    result = finetune(FinetuneConfig(model=ckpt, dataset=toy_npz(tmp_path / "toy.npz", n_per_class=8),
                                     out=str(tmp_path / "run"), steps=3, lp_steps=3, lr=1e-3, batch_size=8,
                                     wise_alphas=[], progress=False, threads=1, device="cpu"))
    ft = load_classifier(result.finetuned)
    zs_model = load_model(ckpt)
    assert_bitwise_equal(ft.clip.state_dict(), zs_model.state_dict())
    zs = ImageClassifier.zeroshot(zs_model, CLASSES, ["a photo of a {}."])
    assert not torch.allclose(ft.head.weight, zs.head.weight)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, ckpt):
    data = toy_npz(tmp_path / "toy.npz", n_per_class=10)
    common = dict(model=ckpt, dataset=data, steps=6, lr=1e-3, batch_size=8, wise_alphas=[], progress=False,
                  threads=1, device="cpu")
    straight = finetune(FinetuneConfig(out=str(tmp_path / "a"), **common))
    first = finetune(FinetuneConfig(out=str(tmp_path / "b"), **common), should_stop=lambda step: step == 3)
    assert first.status == "stopped" and first.steps_done == 3 and first.finetuned is None
    assert (tmp_path / "b" / "checkpoints" / "step_0000003.pt").is_file()
    second = finetune(FinetuneConfig(out=str(tmp_path / "b"), **common))
    assert second.status == "completed" and second.steps_done == 6
    assert_bitwise_equal(load_classifier(straight.finetuned).state_dict(), load_classifier(second.finetuned).state_dict())
    with pytest.raises(ValueError, match="other settings.*lr"):
        finetune(FinetuneConfig(out=str(tmp_path / "b"), **{**common, "lr": 2e-3}))


def test_config_is_checked():
    with pytest.raises(ValueError, match="exactly one of steps / epochs"):
        FinetuneConfig(model="m", dataset="d", out="o", steps=3, epochs=1.0).validate()
    with pytest.raises(ValueError, match="FLYP recipe has no separate head"):
        FinetuneConfig(model="m", dataset="d", out="o", steps=3, recipe="flyp", head="linear").validate()
    with pytest.raises(ValueError, match="shifts: unknown shift 'sepia'"):
        FinetuneConfig(model="m", dataset="d", out="o", steps=3, shifts="grayscale,sepia").validate()
    with pytest.raises(ValueError, match="wise_alphas"):
        FinetuneConfig(model="m", dataset="d", out="o", steps=3, wise_alphas=[0.0, 1.2]).validate()


# --- the command ---------------------------------------------------------------------------------------

def test_cli_on_builtin_scenes(tmp_path, ckpt, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--model", ckpt, "--dataset", "builtin:scenes-seen_colour_shape?n_per_class=6&size=32",
            "--steps", "4", "--lr", "1e-3", "--batch-size", "8", "--wise-alphas", "0,0.5,1",
            "--shifts", "grayscale,blur", "--out", str(out), "--no-progress", "--threads", "1", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "fine-tuned" in printed and "grayscale_acc1" in printed
    for name in ("wise.json", "wise.txt", "wise.png", "wise.html", "summary.json", "metrics.jsonl",
                 "finetuned/model.safetensors", "finetuned/head.safetensors"):
        assert (out / name).is_file(), name
    data = json.loads((out / "wise.json").read_text())
    recs = data["records"]
    assert [r["alpha"] for r in recs] == [0.0, 0.5, 1.0]
    for r in recs:
        assert {"dataset", "model", "pretrained", "task", "metrics"} <= r.keys() and r["task"] == "robustness"
        assert [s["shift"] for s in r["shifts"]] == ["clean", "grayscale", "blur"]
        m = r["metrics"]
        assert 0 <= m["acc1"] <= 1 and m["mean_shift_acc1"] == pytest.approx((m["grayscale_acc1"] + m["blur_acc1"]) / 2)
        assert r["shifts"][0]["n"] == 8 * round(6 * 0.3)  # the held-out 30% of each class
    # the written endpoint models are the zero-shot model (+ its head) and the fine-tuned one, bit for bit
    zs_model = load_file(ckpt)
    assert_bitwise_equal(load_file(out / "wise" / "alpha_0.00" / "model.safetensors"), zs_model)
    assert_bitwise_equal(load_file(out / "wise" / "alpha_1.00" / "model.safetensors"),
                         load_file(out / "finetuned" / "model.safetensors"))
    assert_bitwise_equal(load_file(out / "wise" / "alpha_1.00" / "head.safetensors"),
                         load_file(out / "finetuned" / "head.safetensors"))
    zs = ZeroShotClassifier(load_model(ckpt), recs[0]["classnames"], ["a photo of a {}.", "a {}"], use_cache=False)
    head0 = load_classifier(out / "wise" / "alpha_0.00").head.weight
    torch.testing.assert_close(head0, zs.logit_scale * zs.weights)
    # a re-run skips finished work; other training settings in the same folder are refused in one line
    before = (out / "wise" / "alpha_0.50" / "record.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "wise" / "alpha_0.50" / "record.json").stat().st_mtime_ns == before
    capsys.readouterr()
    assert main([*argv, "--lr", "5e-4"]) == 1  # the later --lr wins
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "lr" in err[0]


def test_cli_sigterm_exits_143_like_train(tmp_path, ckpt, capsys, monkeypatch):
    """SIGTERM mid-run: a checkpoint, then exit 128 + 15 (as `clipforge train`), not SIGINT's 130."""
    import os
    import signal

    import clipforge.finetune.run as ft_run

    real, calls = ft_run.load_batch, []

    def load_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the run's StopRequest (flag, then checkpoint)
        return real(*a, **kw)

    monkeypatch.setattr(ft_run, "load_batch", load_batch)
    data = toy_npz(tmp_path / "toy.npz", n_per_class=10)
    code = main(["finetune", "--model", ckpt, "--dataset", data, "--steps", "6", "--batch-size", "8",
                 "--wise-alphas", "0", "--out", str(tmp_path / "run"), "--no-progress", "--threads", "1",
                 "--device", "cpu"])
    assert code == 143, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "step_0000002.pt").is_file()
    assert "re-run the same command to continue" in capsys.readouterr().err
