"""``clipforge plan``: FLOP counts against hand formulas and a direct count, the memory model's
measurements and search, and the command itself."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipforge import fast
from clipforge import plan as P
from clipforge.cli.main import main
from clipforge.config import get_model_config
from clipforge.models import layers as layers_mod
from tests.conftest import micro_config


def _block(rows: int, keys: int, w: int, mlp: int) -> int:
    """Forward FLOPs of one pre-LN block for ``rows`` query tokens over ``keys`` tokens (2 per
    multiply-accumulate): Q and output projection and MLP for the query rows, K and V for all keys,
    the scores and the weighted sum (causal masking is not discounted: the kernel computes it)."""
    return 2 * (rows * w * w + keys * 2 * w * w + 2 * rows * keys * w + rows * w * w + 2 * rows * w * mlp)


def _hand_forward(cfg, pooled_last: bool = False) -> tuple[int, int, int]:
    """``(image forward, text forward, patch-embedding conv)`` FLOPs per sample of a ViT CLIP: the
    plain model runs every block over every token; with ``pooled_last`` (clipforge's fast path)
    the last block of each tower runs its queries, output projection and MLP for the pooled token only."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    n = v.grid_size ** 2 + 1
    conv = 2 * (n - 1) * 3 * v.patch_size ** 2 * v.width
    last_n, last_L = (1, 1) if pooled_last else (n, t.context_length)
    image = conv + (v.layers - 1) * _block(n, n, v.width, int(v.width * v.mlp_ratio)) \
        + _block(last_n, n, v.width, int(v.width * v.mlp_ratio)) + 2 * v.width * e
    L = t.context_length
    text = (t.layers - 1) * _block(L, L, t.width, int(t.width * t.mlp_ratio)) \
        + _block(last_L, L, t.width, int(t.width * t.mlp_ratio)) + 2 * t.width * e
    return image, text, conv


@pytest.fixture(scope="module")
def micro_flops() -> P.ModelFlops:
    return P.count_model_flops(micro_config("vit"))


@pytest.fixture(scope="module")
def micro_fast_flops() -> P.ModelFlops:
    return P.count_model_flops(micro_config("vit"), fast=True)


@pytest.fixture(scope="module")
def micro_memory() -> P.MemoryModel:
    return P.build_memory_model(micro_config("vit"), "fp32", reserve_gb=0)


@pytest.mark.parametrize("pooled_last", [False, True], ids=["plain", "fast"])
def test_flop_count_equals_matmul_formula(micro_flops, micro_fast_flops, pooled_last):
    cfg = micro_config("vit")
    f = micro_fast_flops if pooled_last else micro_flops
    image, text, conv = _hand_forward(cfg, pooled_last)
    assert f.image_forward == pytest.approx(image, rel=0.01)
    assert f.text_forward == pytest.approx(text, rel=0.01)
    # Backward: two products per forward product (input and weight gradients), except the patch
    # convolution, whose input (the images) needs no gradient.
    assert f.backward == pytest.approx(2 * (image + text) - conv, rel=0.01)
    # Gradient checkpointing re-runs every checkpointed block's forward once more.
    assert 0.5 * f.forward < f.recompute <= f.forward


@pytest.mark.parametrize("fast_path", [False, True], ids=["plain", "fast"])
def test_meta_count_equals_direct_count_on_a_real_model(micro_flops, micro_fast_flops, fast_path):
    """The planner's method (meta device, two tiny batches, slope) against FlopCounterMode around
    a real CPU training step of the real FeatureModel and contrastive loss at batch 6: the plain
    model, and the same model after ``fast.enable`` (what training runs by default)."""
    from clipforge.models import create_model
    from clipforge.training.loss import contrastive_loss
    from clipforge.training.step import FeatureModel

    cfg = micro_config("vit")
    model = create_model(cfg, seed=0).train()
    if fast_path:
        fast.enable(model)
    b = 6
    images = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = torch.randint(1, 1000, (b, cfg.text.context_length))
    ids[:, -1] = 49407  # end-of-text last: the fast path's padding trim keeps the full context, as counted
    if not fast_path:
        ids[0, 5] = 49407  # one short caption: the plain model still runs every position
    # oneDNN linears and the CPU's fused attention kernel are invisible to the counter; torch's
    # linear and the math attention path do the same products.
    with (fast.using_backend("torch"), FlopCounterMode(display=False) as counter,
          sdpa_kernel(SDPBackend.MATH)):
        img, txt, scale = FeatureModel(model)(images, ids)
        loss = contrastive_loss(img, txt, scale)
        loss.backward()
    flops = micro_fast_flops if fast_path else micro_flops
    planned = b * flops.train + P.count_loss_flops(b, b, cfg.embed_dim)
    assert counter.get_total_flops() == pytest.approx(planned, rel=1e-3)
    if fast_path:  # the planner counts every caption at the context length: an upper bound, as the
        ids[0, 5] = 49407  # fast path packs the real tokens of a short caption and skips the rest
        model.zero_grad()
        with (fast.using_backend("torch"), FlopCounterMode(display=False) as short, sdpa_kernel(SDPBackend.MATH)):
            contrastive_loss(*FeatureModel(model)(images, ids)).backward()
        assert short.get_total_flops() < 0.99 * planned


def test_vit_b32_forward_flops_match_the_known_figure():
    """ViT-B/32's image forward is quoted as 4.4 GFLOPs counting multiply-accumulates (fvcore,
    open_clip's profile): 8.8 GFLOPs at 2 per multiply-accumulate, over all 50 tokens in every block."""
    cfg = get_model_config("ViT-B/32")
    model = P.meta_model(cfg)
    images = torch.empty(1, 3, 224, 224, device="meta")
    with FlopCounterMode(display=False) as counter:
        model.visual.forward_intermediates(images)
    full = counter.get_total_flops()
    assert full / 2 / 1e9 == pytest.approx(4.41, rel=0.02)
    # The planner counts the plain model, i.e. this same computation: 8.82 GFLOPs.
    assert P.count_model_flops(cfg, backward=False).image_forward == pytest.approx(full, rel=1e-3)
    # clipforge's fast path runs the last block for the class token only: less by exactly the 49
    # other rows' share of that block.
    w, n = cfg.vision.width, 50
    saved = _block(n, n, w, 4 * w) - _block(1, n, w, 4 * w)
    assert P.count_model_flops(cfg, backward=False, fast=True).image_forward == pytest.approx(full - saved, rel=1e-3)


def test_loss_flops_global_and_local():
    n, b, d = 64, 16, 32
    assert P.count_loss_flops(n, n, d) == 6 * n * n * d  # N x N logits: 1 product forward, 2 backward
    assert P.count_loss_flops(b, n, d, local_loss=True) == 2 * 6 * b * n * d  # two [b, N] blocks


def test_saved_tensor_measurement_matches_a_hand_count():
    """The hooks count every saved storage once, parameters excluded: an MLP block of width d on
    batch B keeps its input, the hidden pre-activation, the sigmoid and the activation output."""
    d, batch = 16, 5
    with torch.device("meta"):
        mlp = layers_mod.MLP(d, 4 * d, "quick_gelu")
    x = torch.empty(batch, d, device="meta", requires_grad=True)
    params = {p.untyped_storage()._cdata for p in mlp.parameters()}
    with P._saved_bytes(params) as seen:
        mlp(x)
        total = sum(seen.values())
    assert total == 4 * batch * (d + 3 * 4 * d)


def test_activation_bytes_match_the_allocator_on_a_real_forward():
    """Independent check of the meta-device measurement: the memory a real CPU forward of the
    training path leaves allocated (torch.profiler's allocation events: everything kept for the
    backward pass, plus the two outputs) equals the saved-tensor count. CPU attention runs a fused
    kernel too, so both keep queries, keys, values, output and log-sum-exp."""
    from torch.profiler import ProfilerActivity, profile

    from clipforge.models import create_model

    cfg = micro_config("vit")
    model = create_model(cfg, seed=0).train()
    b = 6
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        images = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size)
        ids = torch.randint(1, 1000, (b, cfg.text.context_length))
        ids[:, -1] = 49407
        img, txt = P._features(model, images, ids)
    kept = sum(e.self_cpu_memory_usage for e in prof.key_averages()) - 4 * (img.numel() + txt.numel())
    assert P.measure_activation_bytes(cfg, b)[0] == pytest.approx(kept, rel=0.01)


def test_attention_is_measured_without_the_score_matrix():
    """Fused-kernel accounting: no [L, L] probabilities, so the saved bytes per token do not grow
    with the sequence length (the math path's do)."""
    w, heads = 32, 2
    with torch.device("meta"):
        attn = layers_mod.Attention(w, heads)
    params = {p.untyped_storage()._cdata for p in attn.parameters()}

    def per_token(length: int, fused: bool) -> float:
        x = torch.empty(1, length, w, device="meta", requires_grad=True)
        ctx = P._FusedAttention() if fused else sdpa_kernel(SDPBackend.MATH)
        with P._saved_bytes(params) as seen, ctx:
            attn(x)
            return sum(seen.values()) / length

    assert per_token(512, True) == pytest.approx(per_token(64, True), rel=0.1)
    # The math path keeps each token's row of probabilities: heads x L floats more per token.
    assert per_token(512, False) - per_token(64, False) == pytest.approx(heads * (512 - 64) * 4, rel=0.01)


def test_activation_memory_is_linear_and_monotone_in_batch(micro_memory):
    cfg = micro_config("vit")
    mem = micro_memory
    measured = P.measure_activation_bytes(cfg, 5)[0]
    assert mem.activations(5, False) == pytest.approx(measured, rel=1e-6)
    assert mem.act_per_sample_ckpt + mem.ckpt_block_per_sample < mem.act_per_sample
    totals = [mem.total(b, 64, 256, ckpt) for ckpt in (False, True) for b in (1, 2, 8, 32, 64)]
    assert totals[:5] == sorted(totals[:5]) and totals[5:] == sorted(totals[5:])
    assert len(set(totals[:5])) == 5
    # The loss grows with the global batch (N x N logits).
    assert mem.total(8, 8, 1024, False) > mem.total(8, 8, 256, False)
    # Weights, gradients and the two AdamW moments: 4 fp32 copies of the parameters.
    n_params = sum(p.numel() for p in P.meta_model(cfg).parameters())
    assert mem.weights + mem.gradients + mem.optimizer == 4 * 4 * n_params


def test_weight_bytes_follow_the_precision():
    cfg = micro_config("vit")
    fp32, bf16, amp = (P.build_memory_model(cfg, p) for p in ("fp32", "bf16", "amp"))
    assert bf16.weights < fp32.weights and amp.weights == fp32.weights
    assert fp32.autocast_cache == 0 < amp.autocast_cache < fp32.weights / 2


def test_largest_micro_batch_is_the_memory_model_boundary(micro_memory):
    mem = micro_memory
    local, n = 512, 4096
    capacity = mem.total(100, local, n, False) + 1  # room for 100, not 101
    assert mem.largest_micro_batch(local, n, False, capacity) == 100
    b = mem.largest_micro_batch(local, n, True, capacity)
    assert b > 100 and mem.total(b, local, n, True) <= capacity
    assert b == local or mem.total(b + 1, local, n, True) > capacity
    assert mem.largest_micro_batch(local, n, False, mem.total(1, local, n, False) - 1) == 0


def test_accelerators_and_precisions():
    assert P.compute_dtype("amp") == "fp16" and P.compute_dtype("amp_bf16") == "bf16"
    assert P.compute_dtype("fp32") == "fp32" and P.compute_dtype("fp32", tf32=True) == "tf32"
    assert P.get_accelerator("v100").peak("fp16") == 125.0
    assert P.get_accelerator("A100").peak("bf16") == 312.0
    with pytest.raises(ValueError, match="no bf16 peak"):
        P.get_accelerator("V100").peak("bf16")
    with pytest.raises(ValueError, match="unknown accelerator 'TPU'"):
        P.get_accelerator("TPU")


def test_cli_plan_json_out_and_table(tmp_path, capsys):
    out, config = tmp_path / "plan.json", tmp_path / "micro.json"
    config.write_text(micro_config("vit").to_json())
    argv = ["plan", str(config), "--samples", "1M", "--epochs", "2", "--global-batch", "256", "--devices", "4",
            "--accelerator", "custom", "--peak-tflops", "100", "--memory-gb", "1", "--precision", "fp32",
            "--mfu", "0.5", "--reserve-gb", "0"]
    assert main(argv + ["--json", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(out.read_text())
    f = record["flops_per_sample"]
    assert f["total"] == pytest.approx(f["image_forward"] + f["text_forward"] + f["backward"] + f["loss_fwd_bwd"])
    assert record["samples_seen"] == 2_000_000 and record["local_batch"] == 64 and record["steps"] == 7813
    assert record["total_flops"] == pytest.approx(f["total"] * 2e6)
    # The fast path differs from the plain model only in the towers' last blocks, never in the loss.
    g = record["fast_path_flops_per_sample"]
    assert g["loss_fwd_bwd"] == f["loss_fwd_bwd"] and g["image_forward"] < f["image_forward"]
    assert g["total"] == pytest.approx(g["image_forward"] + g["text_forward"] + g["backward"] + g["loss_fwd_bwd"])
    assert record["fast_path_total_flops"] == pytest.approx(g["total"] * 2e6)
    assert record["fast_path_total_flops"] < record["total_flops"]
    assert record["time"]["seconds"] == pytest.approx(record["total_flops"] / (4 * 100e12 * 0.5))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "FLOPs per sample" in text and "clipforge fast path" in text and "largest micro-batch" in text


def test_cli_plan_errors(capsys):
    assert main(["plan", "ViT-B/32", "--accelerator", "TPU"]) == 1
    assert "unknown accelerator 'TPU'" in capsys.readouterr().err
    assert main(["plan", "ViT-B/32", "--accelerator", "V100", "--precision", "amp_bf16"]) == 1
    assert "V100-SXM2-32GB has no bf16 peak" in capsys.readouterr().err
    assert main(["plan", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["plan", "ViT-B/32", "--mfu", "30"]) == 2
    assert "--mfu" in capsys.readouterr().err


@pytest.mark.slow
def test_paper_training_times_within_a_factor_of_two():
    """The README's claim: at MFU 25% the planner lands within 2x of the paper's RN50x64 (18 days on
    592 V100s) and ViT-L/14 (12 days on 256 V100s) runs."""
    rows = P.paper_check(0.25)
    for row in rows:
        assert 0.5 <= row["ratio"] <= 2.0, row["model"]
        assert row["implied_mfu"] == pytest.approx(0.25 * row["ratio"])
