"""LoRA adapters: only they train, merged == unmerged (1e-5), the adapter file is small and
reloads, the fast paths see the adapted weights, and a LoRA run resumes bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import micro_config

from clipforge import fast
from clipforge.checkpoints import load_model, save_model
from clipforge.models import create_model
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint
from clipforge.training.lora import add_lora, load_lora, lora_state_dict, merge_lora, save_lora


def _adapted(use_fast: bool = False, **kw):
    model = create_model(micro_config("vit"), seed=0)
    if use_fast:
        fast.enable(model)
    names = add_lora(model, 4, 8.0, seed=1, **kw)
    with torch.no_grad():  # B starts at zero; give it values so the adapters change the outputs
        g = torch.Generator().manual_seed(2)
        for k, p in model.named_parameters():
            if k.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), names


def test_only_adapters_train():
    model, names = _adapted()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(names) == 16 and len(trainable) == 2 * 16  # 2 towers x 2 blocks x 4 products
    only_attn, names = _adapted(targets=["attn"], towers=["text"])
    assert names == [f"text.transformer.resblocks.{i}.attn.{w}" for i in (0, 1)
                     for w in ("in_proj_weight", "out_proj.weight")]
    with pytest.raises(ValueError, match="lora target 'qkv'"):
        add_lora(create_model(micro_config("vit"), seed=0), 4, 8.0, targets=["qkv"])
    with pytest.raises(ValueError, match="ResNet"):
        add_lora(create_model(micro_config("resnet"), seed=0), 4, 8.0)


@pytest.mark.parametrize("use_fast", [False, True])
def test_merged_equals_unmerged(use_fast):
    model, _ = _adapted(use_fast)
    base = create_model(micro_config("vit"), seed=0).eval()
    x, ids = torch.randn(3, 3, 32, 32), torch.randint(1, 40000, (3, 77))
    with torch.no_grad():
        a, t = model.encode_image(x), model.encode_text(ids)
        assert not torch.allclose(a, base.encode_image(x), atol=1e-3)  # the adapters act
        merge_lora(model)
        assert set(model.state_dict()) == set(base.state_dict())  # standard keys again
        b, u = model.encode_image(x), model.encode_text(ids)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(t, u, atol=1e-5)


def test_fast_paths_see_the_adapters():
    plain, _ = _adapted(False)
    quick, _ = _adapted(True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x), quick.encode_image(x), atol=1e-4)


def test_adapter_file_is_small_and_reloads(tmp_path):
    model, _ = _adapted()
    path = save_lora(model, tmp_path / "lora.safetensors", 4, 8.0, ["attn", "mlp"], ["image", "text"])
    full = sum(p.numel() for n, p in model.named_parameters() if "lora" not in n) * 4
    assert path.stat().st_size < full / 4  # adapters only
    again = load_lora(create_model(micro_config("vit"), seed=0), path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.encode_image(x))
    assert set(lora_state_dict(again)) == set(lora_state_dict(model))
    plain_file = save_model(create_model(micro_config("vit"), seed=0), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a clipforge LoRA file"):
        load_lora(create_model(micro_config("vit"), seed=0), plain_file)


def test_lora_run_trains_adapters_and_resumes_exactly(tmp_path, model_json):
    base = dict(model=model_json, data="builtin:scenes?n=16&size=32", steps=6, batch_size=8, lr=5e-3, warmup=1,
                num_workers=0, save_every=0, log_every=1, deterministic=True, progress=False, threads=1,
                lora_rank=4, lora_alpha=8.0)
    ref = tmp_path / "ref"
    train(TrainConfig(**base, out=str(ref)))
    start = create_model(micro_config("vit"), seed=0).state_dict()
    merged = load_model(ref / "final.safetensors").state_dict()
    assert torch.equal(merged["logit_scale"], start["logit_scale"])  # frozen
    moved = [k for k in start if not torch.equal(start[k], merged[k])]
    assert moved and all(k.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")) for k in moved)
    size = (ref / "lora.safetensors").stat().st_size
    assert size < (ref / "final.safetensors").stat().st_size / 2
    out = tmp_path / "run"
    train(TrainConfig(**base, out=str(out)), should_stop=lambda s: s == 3)
    train(TrainConfig.for_resume(out, progress=False))
    a, b = (load_checkpoint(list_checkpoints(r)[-1][1])["model"] for r in (ref, out))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, out)]
    assert losses[0] == losses[1]
