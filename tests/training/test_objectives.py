"""The paper's three objectives (Figure 2): bag-of-words and caption losses against hand
computation, their zero-shot scorers on planted stand-ins, exact gradient accumulation, short
training runs that save, reload and classify, and the objective as a fixed part of a run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import micro_config
from training.helpers_train import grads, random_batch

from clipforge.checkpoints import load_model, save_model, save_openai
from clipforge.eval import ZeroShotClassifier
from clipforge.finetune.classifier import zeroshot_head_weight
from clipforge.loading import load_for_inference
from clipforge.models import BagOfWordsCLIP, CaptioningCLIP, create_model, with_objective
from clipforge.models.objectives import bag_of_words, caption_targets
from clipforge.tokenizer import tokenize
from clipforge.training import SceneZeroShot, TrainConfig, train
from clipforge.training.objectives import ObjectiveModule, bow_loss, caption_loss, freeze_unused, loss_count
from clipforge.training.distributed import DistEnv
from clipforge.training.step import ObjectiveStep

# A toy vocabulary for hand computation: ids 0..7 are words, 8 start-of-text, 9 end-of-text (the
# highest id, as in the real vocabulary). Id 0 is also the padding id, as in OpenAI's tokenizer.
SOT, EOT, V = 8, 9, 10


def _model(objective: str, seed: int = 0):
    return create_model(dataclasses.replace(micro_config("vit"), objective=objective), seed=seed)


def _log_softmax(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


# --- losses against hand computation -----------------------------------------------------------

def test_bag_of_words_counts_content_positions_not_ids():
    ids = torch.tensor([[SOT, 3, 3, 5, EOT, 0, 0],
                        [SOT, 0, 4, EOT, 0, 0, 0],   # a real token 0 ("!") counts; the padding 0s do not
                        [SOT, EOT, 0, 0, 0, 0, 0]])  # no content: an all-zero bag
    bag = bag_of_words(ids, V)
    expected = torch.zeros(3, V)
    expected[0, 3], expected[0, 5] = 2 / 3, 1 / 3
    expected[1, 0], expected[1, 4] = 1 / 2, 1 / 2
    torch.testing.assert_close(bag, expected)
    assert loss_count("bow", ids) == 2 and loss_count("caption", ids) == 4 + 3 + 1


def test_bow_loss_matches_hand_computation():
    ids = torch.tensor([[SOT, 3, 3, 5, EOT, 0, 0],
                        [SOT, 0, 4, EOT, 0, 0, 0],
                        [SOT, EOT, 0, 0, 0, 0, 0]])
    logits = torch.tensor([[0.1, -0.3, 0.7, 1.5, 0.0, 2.0, -1.0, 0.3, 0.0, 0.4],
                           [1.2, 0.0, -0.5, 0.2, 0.9, -0.1, 0.0, 0.0, 0.3, -2.0],
                           [0.0] * 10])
    lp = [_log_softmax(r) for r in logits.tolist()]
    first = -(2 / 3 * lp[0][3] + 1 / 3 * lp[0][5])
    second = -(1 / 2 * lp[1][0] + 1 / 2 * lp[1][4])
    # the mean runs over the captions that have a content token (the third has none)
    assert float(bow_loss(logits, ids)) == pytest.approx((first + second) / 2, rel=1e-6)
    assert float(bow_loss(logits, ids, reduction="sum")) == pytest.approx(first + second, rel=1e-6)


def test_caption_targets_and_loss_match_hand_computation():
    ids = torch.tensor([[SOT, 3, 5, EOT, 0, 0],
                        [SOT, 7, EOT, 0, 0, 0]])
    inputs, targets, mask = caption_targets(ids)
    # trimmed to the longest caption: position t reads inputs[:, t] and predicts targets[:, t]
    assert inputs.tolist() == [[SOT, 3, 5], [SOT, 7, EOT]]
    assert targets.tolist() == [[3, 5, EOT], [7, EOT, 0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]  # the padding target is ignored
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, V, generator=g)
    lp = [[_log_softmax(logits[b, t].tolist()) for t in range(3)] for b in range(2)]
    terms = [lp[0][0][3], lp[0][1][5], lp[0][2][EOT], lp[1][0][7], lp[1][1][EOT]]
    assert float(caption_loss(logits, targets, mask)) == pytest.approx(-sum(terms) / 5, rel=1e-6)
    assert float(caption_loss(logits, targets, mask, reduction="sum")) == pytest.approx(-sum(terms), rel=1e-6)


def test_objective_module_is_the_loss_of_the_models_outputs():
    images, ids = random_batch(4)
    for objective in ("bow", "caption"):
        model = _model(objective).eval()
        with torch.no_grad():
            total = ObjectiveModule(model)(images, ids)
            if objective == "bow":
                expected = bow_loss(model(images), ids, reduction="sum")
            else:
                inputs, targets, mask = caption_targets(ids)
                expected = caption_loss(model(images, inputs), targets, mask, reduction="sum")
        assert float(total) == pytest.approx(float(expected), rel=1e-5), objective
        # near-uniform predictions at initialisation: about log(vocabulary) per term
        assert float(total) / loss_count(objective, ids) == pytest.approx(math.log(49408), rel=0.05)


@pytest.mark.parametrize("objective", ["bow", "caption"])
def test_gradient_accumulation_is_exact(objective):
    """Two micro-batches with different token counts give the gradient of their union."""
    images, ids = random_batch(6, seed=3)
    results = []
    for batches in ([(images, ids)], [(images[:2], ids[:2]), (images[2:], ids[2:])]):
        model = _model(objective).double().train()
        freeze_unused(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        step = ObjectiveStep(model, ObjectiveModule(model), opt)
        results.append((step.compute_gradients([(im.double(), i) for im, i in batches]), grads(model)))
    (loss1, g1), (loss2, g2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-9)
    assert set(g1) == set(g2) and "head.weight" in g1 and "logit_scale" not in g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7)  # LayerNorm runs in float32


def _objective_grads(objective: str, batches, env: DistEnv | None = None, ddp: bool = False):
    model = _model(objective).double().train()
    freeze_unused(model)
    module = ObjectiveModule(model)
    if ddp:
        module = torch.nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loss = ObjectiveStep(model, module, opt, env=env).compute_gradients(
        [(im.double(), ids) for im, ids in batches])
    return loss, grads(model)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        images, ids = random_batch(6, seed=3)
        sl = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shares: the count is global
        mine = (images[sl], ids[sl])
        env = DistEnv(rank=rank, world_size=2)
        out = {}
        for objective in ("bow", "caption"):
            out[objective] = _objective_grads(objective, [mine], env, ddp=True)
            out[objective + "-accum"] = _objective_grads(
                objective, [(mine[0][:1], mine[1][:1]), (mine[0][1:], mine[1][1:])], env, ddp=True)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~10 s: two processes start (the computation itself is milliseconds)
@pytest.mark.distributed
def test_two_process_ddp_gradients_equal_single_process(tmp_path):
    """DDP over ObjectiveModule: two ranks holding different numbers of captions and tokens get
    the single-process gradient of the union, and the mean of their loss shares is its loss."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    images, ids = random_batch(6, seed=3)
    for objective in ("bow", "caption"):
        ref_loss, ref = _objective_grads(objective, [(images, ids)])
        for key in (objective, objective + "-accum"):
            assert (res[0][key][0] + res[1][key][0]) / 2 == pytest.approx(ref_loss, rel=1e-9), key
            for rank in range(2):
                g = res[rank][key][1]
                assert set(g) == set(ref), key
                for name in ref:
                    torch.testing.assert_close(g[name], ref[name], rtol=1e-5, atol=1e-7)


def test_unused_parameters_are_frozen():
    bow, cap = _model("bow"), _model("caption")
    assert any(n.startswith("text.transformer") for n in freeze_unused(bow))
    assert set(freeze_unused(cap)) == {"text.text_projection", "logit_scale"}
    assert not any(p.requires_grad for n, p in bow.named_parameters() if n.startswith("text."))
    assert cap.text.token_embedding.weight.requires_grad and cap.head.weight.requires_grad


# --- zero-shot scorers on planted stand-ins ----------------------------------------------------

def test_bow_scorer_ranks_the_planted_class_first():
    model = _model("bow").eval()
    cat = int(tokenize(["cat"])[0, 1])
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[cat] = 8.0  # whatever the image: most of the mass on "cat"
    images, _ = random_batch(3)
    templates = ["a photo of a {}.", "a {}"]
    clf = ZeroShotClassifier(model, ["dog", "cat", "bird"], templates, use_cache=False)
    assert clf.objective == "bow" and clf.weights.shape == (3, 49408) and clf.logit_scale == 1.0
    assert clf.predict(images).tolist() == [1, 1, 1]
    probs = clf.predict_proba(images)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    # the score is the mean log-probability of each prompt's tokens, averaged over the templates
    with torch.no_grad():
        log_p = model.bow_logits(clf.image_features(images[:1]).clone()).log_softmax(-1)[0]
    expected = []
    for name in ("dog", "cat", "bird"):
        per_template = []
        for t in templates:
            ids = tokenize([t.format(name)])[0]
            content = ids[1:int(ids.argmax())]
            per_template.append(float(log_p[content].mean()))
        expected.append(sum(per_template) / len(per_template))
    torch.testing.assert_close(clf.logits(images[:1])[0], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_bow_scorer_with_the_prior_removed():
    """A head whose bias puts most mass on "cat" for every image, while each image raises its own
    class's token: as specified every image is called "cat"; with ``bow_prior="scored"`` (log p
    minus the log of its mean over the scored images) each image gets its own class."""
    model = _model("bow").eval()
    names = ["dog", "cat", "bird"]
    tok = [int(tokenize([n])[0, 1]) for n in names]
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[tok[1]] = 10.0
        for i, t in enumerate(tok):
            model.head.weight[t, i] = 3.0
    features = torch.eye(model.config.embed_dim)[:3]          # unit-norm image embeddings e0, e1, e2
    plain = ZeroShotClassifier(model, names, ["a photo of a {}."], use_cache=False)
    assert plain.scores(features).argmax(1).tolist() == [1, 1, 1]
    pmi = ZeroShotClassifier(model, names, ["a photo of a {}."], use_cache=False, bow_prior="scored", batch_size=2)
    scores = pmi.scores(features)
    assert scores.argmax(1).tolist() == [0, 1, 2]
    with torch.no_grad():
        log_p = model.bow_logits(features).log_softmax(-1)
    expected = (log_p - log_p.exp().mean(0).log()) @ pmi.weights.t()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bow_prior"):
        ZeroShotClassifier(model, names, ["a {}"], use_cache=False, bow_prior="batch")


def test_caption_scorer_ranks_the_planted_class_first():
    model = _model("caption").eval()
    dog = int(tokenize(["dog"])[0, 1])
    base = model.token_logits

    def favour_dog(states: torch.Tensor) -> torch.Tensor:  # a decoder that always expects "dog"
        logits = base(states).clone()
        logits[..., dog] += 6.0
        return logits

    model.token_logits = favour_dog  # type: ignore[method-assign]
    images, _ = random_batch(3)
    clf = ZeroShotClassifier(model, ["cat", "dog", "bird"], ["a photo of a {}.", "a {}"], use_cache=False)
    assert clf.objective == "caption" and clf.weights is None and clf.num_classes == 3
    assert clf.predict(images).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="no head to save"):
        clf.save("unused.safetensors")


def test_caption_prompt_log_likelihood_equals_teacher_forcing():
    """The chunked, prefix-shared computation equals a plain per-pair teacher-forced mean."""
    model = _model("caption", seed=1).eval()
    ids = tokenize(["a photo of a cat.", "a photo of a red triangle.", "a dog"])
    feats = F.normalize(torch.randn(2, 32), dim=-1)
    ll = model.prompt_log_likelihood(feats, ids, rows_per_chunk=2)
    with torch.no_grad():
        for i in range(2):
            for q in range(3):
                end = int(ids[q].argmax())
                row = ids[q:q + 1, :end + 1]
                lp = model.token_logits(model.decode(feats[i:i + 1], row))[0].log_softmax(-1)
                expected = torch.stack([lp[j, row[0, j + 1]] for j in range(end)]).mean()
                assert float(ll[i, q]) == pytest.approx(float(expected), abs=1e-5)


def test_contrastive_classifier_unchanged_and_bow_head_round_trips(tmp_path, micro_vit):
    clf = ZeroShotClassifier(micro_vit, ["cat", "dog"], ["a {}"], use_cache=False)
    assert clf.objective == "contrastive" and clf.weights.shape == (2, 32)
    model = _model("bow").eval()
    bow = ZeroShotClassifier(model, ["cat", "dog"], ["a {}"], cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # generative scorers do not use the disk cache
    bow.save(tmp_path / "head.safetensors")
    again = ZeroShotClassifier.load(tmp_path / "head.safetensors", model)
    torch.testing.assert_close(again.weights, bow.weights)
    with pytest.raises(ValueError, match="objective 'bow'"):
        ZeroShotClassifier.load(tmp_path / "head.safetensors", micro_vit)


def test_scene_evaluation_scores_every_objective():
    evaluator = SceneZeroShot(n_per_class=1)
    for objective in ("bow", "caption"):
        out = evaluator(_model(objective).eval(), 0)
        tasks = {"heldout_colour_shape", "seen_colour_shape", "counting", "position", "relation"}
        expected = {f"{t}_acc" for t in tasks}
        if objective == "bow":  # also scored with the token prior removed
            expected |= {f"{t}_calibrated_acc" for t in tasks}
        assert set(out) == expected
        assert all(0.0 <= v <= 1.0 for v in out.values())


# --- models, checkpoints -----------------------------------------------------------------------

def test_objective_models_save_reload_and_refuse_foreign_formats(tmp_path, micro_vit):
    for objective, cls in (("bow", BagOfWordsCLIP), ("caption", CaptioningCLIP)):
        model = with_objective(micro_vit, objective, seed=0)
        assert isinstance(model, cls) and model.config.objective == objective
        torch.testing.assert_close(model.visual.conv1.weight, micro_vit.visual.conv1.weight)
        path = save_model(model, tmp_path / f"{objective}.safetensors")
        back = load_model(path)
        assert type(back) is cls and back.config.objective == objective
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
        with pytest.raises(ValueError, match="cannot hold"):
            save_openai(model, tmp_path / f"{objective}.pt")
        with pytest.raises(ValueError, match="contrastive zero-shot head"):
            zeroshot_head_weight(model, ["cat"], ["a {}"])
    assert "objective" not in micro_vit.config.to_dict()  # contrastive configs read as before


# --- training runs -----------------------------------------------------------------------------

DATA = "builtin:scenes?n=16&size=32"


def _config(model_json: str, out: Path, **kw) -> TrainConfig:
    base = dict(model=model_json, data=DATA, steps=2, batch_size=4, lr=1e-3, warmup=1, num_workers=0,
                out=str(out), save_every=0, log_every=1, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module", params=["bow", "caption"])
def run(request, tmp_path_factory, model_json) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "run"
    summary = train(_config(model_json, out, objective=request.param))
    assert summary["status"] == "completed" and summary["steps_done"] == 2
    assert summary["objective"] == request.param and summary["parameters"]["head"] > 0
    return request.param, out


def test_run_saves_a_model_that_reloads_and_classifies(run):
    objective, out = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    model = load_model(out / "final.safetensors")
    assert model.config.objective == objective and model.head.weight.shape[0] in (49408, 64)
    images, _ = random_batch(2)
    clf = ZeroShotClassifier(model, ["red triangle", "blue square"], ["a photo of a {}."], use_cache=False)
    probs = clf.predict_proba(images)
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(1), torch.ones(2))
    fast, _ = load_for_inference(out / "final.safetensors")
    fast_clf = ZeroShotClassifier(fast, ["red triangle", "blue square"], ["a photo of a {}."], use_cache=False)
    torch.testing.assert_close(fast_clf.logits(images), clf.logits(images), rtol=1e-4, atol=1e-4)


def test_objective_is_recorded_and_cannot_change_on_resume(run, model_json):
    objective, out = run
    assert json.loads((out / "config.json").read_text())["objective"] == objective
    assert json.loads((out / "model_config.json").read_text())["objective"] == objective
    other = "caption" if objective == "bow" else "contrastive"
    with pytest.raises(ValueError, match="objective"):
        TrainConfig.for_resume(out, objective=other)
    with pytest.raises(ValueError, match="objective"):
        train(_config(model_json, out, objective=other, resume=str(out), steps=3))
    assert TrainConfig.for_resume(out, steps=2).objective == objective


def test_objective_config_is_validated(tmp_path, model_json):
    with pytest.raises(ValueError, match="objective"):
        _config(model_json, tmp_path, objective="captions")
    for bad in ({"hard_negatives": "swap"}, {"local_loss": True, "gather_with_grad": True}, {"val_data": DATA}):
        with pytest.raises(ValueError, match="contrastive-training option"):
            _config(model_json, tmp_path, objective="bow", **bad)


def test_cli_objective_flag(tmp_path, model_json):
    from clipforge.cli.main import build_parser
    from clipforge.cli.train import config_from_args

    args = build_parser().parse_args(["train", "--model", model_json, "--objective", "caption", "--out", str(tmp_path)])
    assert config_from_args(args).objective == "caption"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--objective", "captions"])
