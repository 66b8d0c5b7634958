"""Distillation: the loss equals a hand computation of open_clip's DistillClipLoss, gradients are
exact under accumulation, the teacher is frozen and nothing of it is cached, and a distilled run
resumes bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import micro_config

from clipforge.checkpoints import save_model
from clipforge.models import create_model
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint
from clipforge.training.distill import DistillLoss, Teacher, distill_loss
from clipforge.training.loss import ClipLoss, contrastive_loss
from clipforge.training.step import FeatureModel, TrainStep
from training.helpers_train import grads, random_batch


def test_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    n, d = 4, 6
    img, txt, t_img, t_txt = (F.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(4))
    s, t = torch.tensor(7.0), torch.tensor(20.0)
    total = 0.0
    for student, teacher in ((s * img @ txt.t(), t * t_img @ t_txt.t()),
                             (s * txt @ img.t(), t * t_txt @ t_img.t())):
        rows = []
        for i in range(n):
            zt = sum(math.exp(float(teacher[i, j])) for j in range(n))
            zs = sum(math.exp(float(student[i, j])) for j in range(n))
            rows.append(-sum(math.exp(float(teacher[i, j])) / zt * (float(student[i, j]) - math.log(zs))
                             for j in range(n)))
        total += sum(rows) / n
    assert float(distill_loss(img, txt, s, t_img, t_txt, t)) == pytest.approx(total / 2, rel=1e-5)
    # the student equal to the teacher: the term is the teacher's entropy, its minimum over students
    same = distill_loss(t_img, t_txt, t, t_img, t_txt, t)
    assert float(same) < float(distill_loss(img, txt, s, t_img, t_txt, t))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(create_model(micro_config("vit"), seed=5), path)
    return str(path)


def test_exact_under_accumulation_and_adds_to_the_contrastive_loss(teacher_path):
    images, ids = random_batch(8, 32)
    out = []
    for k in (1, 2):
        model = create_model(micro_config("vit"), seed=0).train()
        teacher = Teacher(teacher_path, model, torch.device("cpu"))
        loss = DistillLoss(ClipLoss(), teacher, 0.5)
        step = TrainStep(model, FeatureModel(model), loss, torch.optim.SGD(model.parameters(), lr=0.0))
        parts = [(images, ids)] if k == 1 else [(images[:4], ids[:4]), (images[4:], ids[4:])]
        value = step.compute_gradients(parts)
        out.append((value, grads(model)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for name, g in out[0][1].items():
        assert torch.allclose(g, out[1][1][name], atol=1e-6, rtol=1e-4), name
    model = create_model(micro_config("vit"), seed=0).eval()
    with torch.no_grad():
        img, txt = (F.normalize(f, dim=-1) for f in (model.encode_image(images), model.encode_text(ids)))
        t_img, t_txt, t_scale = Teacher(teacher_path, model, torch.device("cpu")).features([(images, ids)])
        scale = model.logit_scale.exp()
        expected = contrastive_loss(img, txt, scale) + 0.5 * distill_loss(img, txt, scale, t_img, t_txt, t_scale)
    assert out[0][0] == pytest.approx(float(expected), rel=1e-5)
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_teacher_of_another_resolution_gets_resized_images(tmp_path):
    import dataclasses

    from clipforge.config import PreprocessConfig

    cfg = micro_config("vit")
    big = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=48),
                              preprocess=PreprocessConfig(image_size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    path = save_model(create_model(big, seed=1), tmp_path / "big.safetensors")
    student = create_model(cfg, seed=0)
    teacher = Teacher(str(path), student, torch.device("cpu"))
    images, ids = random_batch(3, 32)
    t_img, _, _ = teacher.features([(images, ids)])
    assert t_img.shape == (3, cfg.embed_dim)
    resized = F.interpolate(images * torch.tensor(cfg.preprocess.std)[:, None, None] / 0.5
                            + (torch.tensor(cfg.preprocess.mean)[:, None, None] - 0.5) / 0.5,
                            size=(48, 48), mode="bicubic", antialias=True)
    with torch.no_grad():
        direct = F.normalize(teacher.model.encode_image(resized).float(), dim=-1)
    assert torch.allclose(t_img, direct, atol=1e-5)  # re-normalised to the teacher's mean/std, then resized


def test_distilled_run_resumes_exactly(tmp_path, model_json, teacher_path):
    base = dict(model=model_json, data="builtin:scenes?n=16&size=32", steps=6, batch_size=8, lr=2e-3, warmup=1,
                num_workers=0, save_every=0, log_every=1, deterministic=True, progress=False, threads=1,
                distill_model=teacher_path, distill_weight=0.7, accum_steps=2)
    ref = tmp_path / "ref"
    train(TrainConfig(**base, out=str(ref)))
    out = tmp_path / "run"
    train(TrainConfig(**base, out=str(out)), should_stop=lambda s: s == 2)
    train(TrainConfig.for_resume(out, progress=False))
    a, b = (load_checkpoint(list_checkpoints(r)[-1][1])["model"] for r in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, out)]
    assert losses[0] == losses[1]
    assert json.loads((ref / "config.json").read_text())["distill_weight"] == 0.7
    plain = tmp_path / "plain"
    train(TrainConfig(**{**base, "distill_model": None}, out=str(plain)))
    first = [json.loads(x)["loss"] for x in (plain / "metrics.jsonl").read_text().splitlines()][0]
    assert losses[0][0] > first  # the distillation term is added (it is positive)


def test_bad_distillation_options(tmp_path, model_json):
    with pytest.raises(ValueError, match="objective contrastive"):
        TrainConfig(distill_model="x", objective="bow")
    with pytest.raises(ValueError, match="local_loss"):
        TrainConfig(distill_model="x", local_loss=True)
    with pytest.raises(FileNotFoundError, match="nope"):
        train(TrainConfig(model=model_json, data="builtin:scenes?n=16&size=32", steps=1, batch_size=8, num_workers=0,
                          progress=False, out=str(tmp_path / "r"), distill_model=str(tmp_path / "nope.safetensors")))
