"""Two Gloo processes on CPU produce the gradient of one process on the union batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import micro_config
from training.helpers_train import grads, random_batch

from clipforge.models import create_model
from clipforge.training.distributed import DistEnv
from clipforge.training.loss import ClipLoss
from clipforge.training.step import FeatureModel, TrainStep

WORLD = 2
PER_RANK = 4
# (local_loss, gather_with_grad, accumulation steps)
MODES = [(False, False, 1), (False, True, 1), (True, True, 1), (False, False, 2), (True, True, 2)]


def _model():
    return create_model(micro_config("vit"), seed=0).double().train()


def _compute(model, module, loss_fn, batches):
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = TrainStep(model, module, loss_fn, opt).compute_gradients(batches)
    return loss, grads(model)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        env = DistEnv(rank=rank, world_size=WORLD)
        images, ids = random_batch(WORLD * PER_RANK, seed=5)
        images = images.double()
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for local, gwg, k in MODES:
            model = _model()
            ddp = torch.nn.parallel.DistributedDataParallel(FeatureModel(model))
            batches = list(zip(images[sl].chunk(k), ids[sl].chunk(k)))
            results[(local, gwg, k)] = _compute(model, ddp, ClipLoss(env, local, gwg), batches)
        try:
            ClipLoss(env, local_loss=True, gather_with_grad=False)
            results["refused"] = False
        except ValueError:
            results["refused"] = True
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_gloo_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    images, ids = random_batch(WORLD * PER_RANK, seed=5)
    model = _model()
    ref_loss, ref = _compute(model, FeatureModel(model), ClipLoss(), [(images.double(), ids)])
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert res["refused"], "local loss without gather_with_grad must be refused on 2 ranks"
        for mode in MODES:
            loss, g = res[mode]
            local_loss = mode[0]
            if not local_loss:  # a local loss value is this rank's rows only
                assert loss == pytest.approx(ref_loss, rel=1e-9), mode
            assert set(g) == set(ref), mode
            for name in ref:
                torch.testing.assert_close(g[name], ref[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, md=mode: f"{md} {n}: {m}")


def _run_worker(rank: int, init_file: str, model_json: str, root: str) -> None:
    """One rank of: an uninterrupted 2-process run, and the same run stopped at step 3 and resumed."""
    import functools
    import operator

    from clipforge.training import TrainConfig, train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        def cfg(out: str) -> TrainConfig:
            return TrainConfig(model=model_json, data="builtin:scenes?n=64&size=32", steps=7, batch_size=4,
                               warmup=2, lr=2e-3, num_workers=0, out=out, save_every=0, log_every=1,
                               deterministic=True, progress=False, threads=1, gather_with_grad=True,
                               local_loss=True, accum_steps=2)
        train(cfg(f"{root}/a"))
        first = train(cfg(f"{root}/b"), should_stop=functools.partial(operator.eq, 3))
        assert first["steps_done"] == 3, first
        train(TrainConfig.for_resume(f"{root}/b", progress=False))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_run_resumes_exactly(tmp_path):
    from clipforge.training.checkpoint import list_checkpoints, load_checkpoint

    model_json = tmp_path / "micro.json"
    model_json.write_text(micro_config("vit").to_json())
    mp.spawn(_run_worker, args=(str(tmp_path / "init"), str(model_json), str(tmp_path)), nprocs=WORLD, join=True)
    a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1][1])
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1][1])
    assert a["step"] == b["step"] == 7 and len(a["rank_states"]) == WORLD
    assert [r["loader"]["rank"] for r in a["rank_states"]] == [0, 1]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
