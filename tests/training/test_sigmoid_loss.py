"""SigLIP's sigmoid loss: its value by hand, exact gradient accumulation, 2 Gloo processes = 1
process, and the training run with ``--siglip`` (init, records, resume, refusals)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipforge.cli.main import main
from clipforge.models import create_model
from clipforge.training import TrainConfig, train
from clipforge.training.distributed import DistEnv
from clipforge.training.loss import ClipLoss
from clipforge.training.sigmoid_loss import SigLipLoss, sigmoid_loss
from clipforge.training.step import FeatureModel, TrainStep, make_train_step

from conftest import micro_config
from training.helpers_train import grads, random_batch

WORLD, PER_RANK = 2, 4


def _siglip_model(dtype=torch.float64):
    cfg = dataclasses.replace(micro_config("vit"), init_logit_bias=-10.0, init_logit_scale=math.log(10))
    return create_model(cfg, seed=0).to(dtype).train()


def test_value_equals_a_hand_computation_float64():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=-1)
    t, b = 7.5, -2.25
    total = 0.0
    for i in range(3):
        for j in range(3):
            cos = sum(float(img[i, d]) * float(txt[j, d]) for d in range(5))
            z = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-z * (t * cos + b)))  # -log sigmoid(z * logit)
    expected = total / 3  # open_clip's SigLipLoss: divided by the number of images
    got = sigmoid_loss(img, txt, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # Positives at an offset (a rank's images among all ranks' texts) and refusals.
    wide = torch.cat([txt[:1], txt])
    assert float(sigmoid_loss(img, wide[1:], torch.tensor(t), torch.tensor(b))) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="positives"):
        sigmoid_loss(img, txt, torch.tensor(t), torch.tensor(b), offset=1)


def _gradients(model, batches, loss_fn=None):
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = TrainStep(model, FeatureModel(model), loss_fn or SigLipLoss(), opt).compute_gradients(batches)
    return loss, grads(model)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_full_batch(k):
    model = _siglip_model()
    with torch.no_grad():  # away from the init (where every negative's sigmoid is ~0): every pair counts
        model.logit_bias.fill_(-1.0)
    images, ids = random_batch(8, seed=1)
    images = images.double()
    full_loss, full = _gradients(model, [(images, ids)])
    acc_loss, acc = _gradients(model, list(zip(images.chunk(k), ids.chunk(k))))
    assert acc_loss == pytest.approx(full_loss, rel=1e-10)
    assert {"logit_scale", "logit_bias"} <= set(full) and set(acc) == set(full)
    for name in full:  # the tolerance of the contrastive test: LayerNorm computes in float32 (OpenAI's)
        torch.testing.assert_close(acc[name], full[name], rtol=1e-5, atol=1e-7, msg=name)
    # And this is not what summing independent micro-batch losses gives (the pairs across them count).
    model.zero_grad(set_to_none=True)
    fm = FeatureModel(model)
    for im, tx in zip(images.chunk(k), ids.chunk(k)):
        (SigLipLoss()(*fm(im, tx)) / k).backward()
    assert not torch.allclose(model.logit_bias.grad, full["logit_bias"], rtol=1e-3)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        env = DistEnv(rank=rank, world_size=WORLD)
        images, ids = random_batch(WORLD * PER_RANK, seed=5)
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for k in (1, 2):
            model = _siglip_model()
            ddp = torch.nn.parallel.DistributedDataParallel(FeatureModel(model))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            batches = list(zip(images[sl].double().chunk(k), ids[sl].chunk(k)))
            loss = TrainStep(model, ddp, SigLipLoss(env), opt).compute_gradients(batches)
            results[k] = (loss, grads(model))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~40 s on a loaded 2-core machine: two spawned interpreters
@pytest.mark.distributed
def test_two_process_gloo_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    images, ids = random_batch(WORLD * PER_RANK, seed=5)
    ref_loss, ref = _gradients(_siglip_model(), [(images.double(), ids)])
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for k in (1, 2):
        # Each rank's loss is its images' share; their mean (what the loop logs) is the global loss.
        assert sum(res[k][0] for res in per_rank) / WORLD == pytest.approx(ref_loss, rel=1e-6), k  # float32 features
        for res in per_rank:  # DDP averaged the gradients: every rank holds the global batch's
            g = res[k][1]
            assert set(g) == set(ref)
            for name in ref:  # the loss runs on float32 features: float32 rounding of each tensor's scale
                tol = 1e-5 * float(ref[name].abs().max())
                torch.testing.assert_close(g[name], ref[name], rtol=1e-5, atol=tol,
                                           msg=lambda m, n=name, kk=k: f"k={kk} {n}: {m}")


# --- the run -----------------------------------------------------------------------------------

DATA = "builtin:scenes?n=32&size=32"


def _config(model_json: str, out, **kw) -> TrainConfig:
    base = dict(model=model_json, data=DATA, steps=4, batch_size=8, lr=2e-3, warmup=1, num_workers=0,
                out=str(out), save_every=0, log_every=1, deterministic=True, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_siglip_run_initialises_records_and_resumes(tmp_path, model_json):
    from clipforge.checkpoints import load_model
    from clipforge.cli.info import describe

    out = tmp_path / "run"
    assert main(["train", "--siglip", "--model", model_json, "--data", DATA, "--steps", "4", "--batch-size", "8",
                 "--warmup", "1", "--workers", "0", "--out", str(out), "--save-every", "2", "--log-every", "1",
                 "--no-progress", "--threads", "1", "--deterministic"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["loss"] == "siglip"
    model_cfg = json.loads((out / "model_config.json").read_text())
    assert model_cfg["init_logit_bias"] == -10.0 and model_cfg["init_logit_scale"] == pytest.approx(math.log(10))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["temperature"] == pytest.approx(10.0, rel=0.05)  # the paper's t = 10 after one step
    assert all(math.isfinite(r["loss"]) and "logit_bias" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "siglip" and summary["final_logit_bias"] != -10.0  # the bias was trained
    model = load_model(out / "final.safetensors")
    assert float(model.logit_bias.detach()) == pytest.approx(summary["final_logit_bias"])
    rec = describe(out / "final.safetensors")
    assert rec["loss"] == "siglip" and rec["logit_bias"] == pytest.approx(summary["final_logit_bias"], abs=1e-4)
    # A resumed run keeps its loss (a changed one is refused).
    assert TrainConfig.for_resume(out).loss == "siglip"
    with pytest.raises(ValueError, match="loss"):
        TrainConfig.for_resume(out, loss="clip")


def test_siglip_from_a_bias_free_checkpoint_adds_the_bias(tmp_path, model_json):
    from clipforge.checkpoints import save_model
    from clipforge.training.loop import build_model

    init = save_model(create_model(micro_config("vit"), seed=3), tmp_path / "clip.safetensors")
    model = build_model(_config(model_json, tmp_path / "r", init=str(init), loss="siglip"))
    assert float(model.logit_bias.detach()) == -10.0 and model.config.init_logit_bias == -10.0
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))  # the weights' own temperature
    # A model that has a bias keeps it (and its temperature) untouched.
    cfg_path = tmp_path / "biased.json"
    cfg_path.write_text(dataclasses.replace(micro_config("vit"), init_logit_bias=-5.0).to_json())
    model = build_model(_config(str(cfg_path), tmp_path / "r2", loss="siglip"))
    assert model.config.init_logit_bias == -5.0 and model.config.init_logit_scale == pytest.approx(math.log(1 / 0.07))


def test_refusals_are_one_line(tmp_path, model_json, capsys):
    with pytest.raises(ValueError, match="hard_negatives"):
        _config(model_json, tmp_path / "a", loss="siglip", hard_negatives="swap")
    with pytest.raises(ValueError, match="objective"):
        _config(model_json, tmp_path / "a", loss="siglip", objective="bow")
    cfg_path = tmp_path / "biased.json"
    cfg_path.write_text(dataclasses.replace(micro_config("vit"), init_logit_bias=-10.0).to_json())
    with pytest.raises(ValueError, match="--loss siglip"):  # softmax loss would leave the bias untrained
        train(_config(str(cfg_path), tmp_path / "b"))
    model = create_model(micro_config("vit"), seed=0)
    with pytest.raises(ValueError, match="logit_bias"):
        make_train_step(model, FeatureModel(model), torch.optim.SGD(model.parameters(), lr=0.1), loss="siglip")
    assert main(["train", "--loss", "siglip", "--hard-negatives", "swap", "--model", model_json, "--data", DATA,
                 "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hard_negatives" in err[0]


def test_clip_loss_still_takes_bias_free_features():
    """The softmax loss path is unchanged for models without a bias (three features)."""
    model = create_model(micro_config("vit"), seed=0).double().train()
    images, ids = random_batch(4, seed=0)
    loss, g = _gradients(model, [(images.double(), ids)], ClipLoss())
    assert math.isfinite(loss) and "logit_bias" not in g
