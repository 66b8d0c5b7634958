"""``clipforge finetune`` with train's recipes (one shared option group, the same config fields):
LoRA leaves the adapter-only file, locked layers get no update, resumption is exact, and the
flags reach the config."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clipforge.checkpoints import save_model
from clipforge.cli.main import main
from clipforge.finetune import FinetuneConfig, finetune, load_classifier
from clipforge.training import MODEL_RECIPE_FIELDS, TrainConfig

from finetune.test_finetune import assert_bitwise_equal, toy_npz


@pytest.fixture
def ckpt(tmp_path, micro_vit):
    return str(save_model(micro_vit, tmp_path / "zs.safetensors"))


def _cfg(tmp_path, ckpt, out="run", **kw) -> FinetuneConfig:
    base = dict(model=ckpt, dataset=toy_npz(tmp_path / "toy.npz", n_per_class=8), out=str(tmp_path / out), steps=4,
                lr=1e-3, batch_size=8, wise_alphas=[], progress=False, threads=1, device="cpu")
    return FinetuneConfig(**{**base, **kw})


def test_lora_finetune_saves_the_adapters_alone_and_moves_only_adapted_weights(tmp_path, ckpt):
    result = finetune(_cfg(tmp_path, ckpt, lora_rank=2, lora_targets=["attn"], lora_towers=["image"]))
    lora = result.finetuned / "lora.safetensors"
    assert lora.is_file()
    tensors = load_file(lora)
    assert tensors and all(k.endswith((".lora_a", ".lora_b")) for k in tensors)
    assert all(k.startswith("visual.") for k in tensors)  # image tower only, as asked
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "clipforge-lora" and meta["rank"] == "2" and meta["targets"] == "attn"
    assert any(bool(v.any()) for k, v in tensors.items() if k.endswith(".lora_b"))  # B moved from zero
    # the merged model: the adapted products changed, every other base weight bit for bit the zero-shot one
    ft = load_file(result.finetuned / "model.safetensors")
    zs = load_file(ckpt)
    adapted = {k for k in zs if k.startswith("visual.") and k.endswith(("in_proj_weight", "out_proj.weight"))}
    assert adapted and all(not torch.equal(ft[k], zs[k]) for k in adapted)
    assert_bitwise_equal({k: ft[k] for k in zs if k not in adapted}, {k: zs[k] for k in zs if k not in adapted})
    # the head (CE) still trained
    head = load_classifier(result.finetuned).head.weight
    from clipforge.finetune import ImageClassifier, open_splits
    from clipforge.checkpoints import load_model

    splits = open_splits(_cfg(tmp_path, ckpt))
    assert not torch.allclose(head, ImageClassifier.zeroshot(load_model(ckpt), splits.classnames, splits.templates).head.weight)


def test_locked_groups_get_no_update(tmp_path, ckpt):
    """--lock-image with one unlocked group: every image parameter but the last group's (proj) is left
    bit for bit; with flyp --lock-text (2 unlocked groups) the text tower's lower groups too."""
    result = finetune(_cfg(tmp_path, ckpt, recipe="flyp", lock_image=True, lock_image_unlocked_groups=1,
                           lock_text=True, lock_text_unlocked_layers=2, lock_text_freeze_layer_norm=True))
    ft = load_file(result.finetuned / "model.safetensors")
    zs = load_file(ckpt)
    moved = {k for k in zs if not torch.equal(ft[k], zs[k])}
    assert "visual.proj" in moved and "text.text_projection" in moved and "logit_scale" in moved
    # text: 2 blocks -> groups [embeddings], [block 0], [block 1 + ln_final], [projection]: the last 2 train
    assert any(k.startswith("text.transformer.resblocks.1.") for k in moved)
    frozen = {k for k in zs if (k.startswith("visual.") and k != "visual.proj")
              or k.startswith(("text.token_embedding", "text.positional_embedding", "text.transformer.resblocks.0."))}
    assert frozen and not (frozen & moved), sorted(frozen & moved)


def test_recipe_run_resumes_bit_for_bit(tmp_path, ckpt):
    """LoRA + patch dropout + layer decay + const-cooldown, interrupted at step 2 and continued."""
    kw = dict(lora_rank=2, patch_dropout=0.5, layer_decay_image=0.7, lr_scheduler="const-cooldown",
              lr_cooldown_steps=2, recipe="flyp")
    straight = finetune(_cfg(tmp_path, ckpt, out="a", **kw))
    first = finetune(_cfg(tmp_path, ckpt, out="b", **kw), should_stop=lambda step: step == 2)
    assert first.status == "stopped" and first.steps_done == 2
    second = finetune(_cfg(tmp_path, ckpt, out="b", **kw))
    assert second.status == "completed" and second.steps_done == 4
    assert_bitwise_equal(load_classifier(straight.finetuned).state_dict(), load_classifier(second.finetuned).state_dict())
    assert_bitwise_equal(load_file(straight.finetuned / "lora.safetensors"), load_file(second.finetuned / "lora.safetensors"))
    with pytest.raises(ValueError, match="other settings.*patch_dropout"):
        finetune(_cfg(tmp_path, ckpt, out="b", **{**kw, "patch_dropout": 0.25}))


def test_flyp_distillation_runs_and_ce_distillation_is_refused(tmp_path, ckpt):
    plain = finetune(_cfg(tmp_path, ckpt, out="plain", recipe="flyp"))
    dist = finetune(_cfg(tmp_path, ckpt, out="dist", recipe="flyp", distill_model=ckpt, distill_weight=2.0))
    assert dist.status == "completed"
    import json

    losses = [[json.loads(x)["loss"] for x in (r.out / "metrics.jsonl").read_text().splitlines()] for r in (plain, dist)]
    assert losses[0] != losses[1]  # the distillation term is part of the logged loss
    with pytest.raises(ValueError, match="distill_model.*recipe flyp only"):
        _cfg(tmp_path, ckpt, distill_model=ckpt).validate()


def test_train_and_finetune_share_one_recipe_option_group(tmp_path, ckpt, monkeypatch):
    from clipforge.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    def recipe_dests(p: argparse.ArgumentParser) -> set[str]:
        g = next(g for g in p._action_groups if g.title.startswith("training recipes acting on the model"))
        return {a.dest for a in g._group_actions}

    assert recipe_dests(sub.choices["train"]) == recipe_dests(sub.choices["finetune"]) == set(MODEL_RECIPE_FIELDS)
    assert set(MODEL_RECIPE_FIELDS) <= {f for f in TrainConfig.__dataclass_fields__}
    seen = {}
    import clipforge.finetune as ft_pkg

    def fake(config):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(ft_pkg, "finetune", fake)
    code = main(["finetune", "--model", ckpt, "--dataset", "d.npz", "--steps", "3", "--out", str(tmp_path / "o"),
                 "--lora-rank", "4", "--lora-towers", "image", "--lock-text", "--patch-dropout", "0.5",
                 "--layer-decay-text", "0.8", "--lr-scheduler", "const", "--distill-model", ckpt,
                 "--distill-weight", "0.5"])
    assert code == 1
    c = seen["config"]
    assert (c.lora_rank, c.lora_towers, c.lock_text, c.patch_dropout, c.layer_decay_text, c.lr_scheduler,
            c.distill_model, c.distill_weight) == (4, ["image"], True, 0.5, 0.8, "const", ckpt, 0.5)
    assert c.lora_alpha == 16.0 and c.lock_image is False  # the rest at the shared defaults
