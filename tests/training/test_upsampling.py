"""``--train-data-upsampling-factors`` (open_clip's per-source weights of '::'-joined shard sources
under --resampled): the per-source sample counts follow the factors, the stream is seeded and
resumes exactly, and bad factors are one-line errors naming the option."""

from __future__ import annotations

import pytest
import torch

from clipforge.cli.main import main
from clipforge.data import make_pair_loader, open_pairs
from clipforge.training import TrainConfig, train
from clipforge.training.checkpoint import list_checkpoints, load_checkpoint

from data.datatestutil import char_decode, char_tokenize, image_bytes, sample_members, tiny_transform, write_tar


def _sources(root) -> str:
    """Two sources of 2 shards x 4 samples each; captions start with the source's letter."""
    for src in ("a", "b"):
        for s in range(2):
            members = []
            for i in range(4):
                key = f"{src}{s}{i:03d}"
                members += sample_members(key, f"{src} photo number {s * 4 + i}", img=image_bytes((40 * s + 20 * i, 90, 200)))
            write_tar(root / src / f"{s:05d}.tar", members)
    return f"{root}/a/{{00000..00001}}.tar::{root}/b/{{00000..00001}}.tar"


def _counts(spec: str, factors, steps: int, seed: int = 0, state=None, batch_size: int = 8):
    src = open_pairs(spec, upsampling_factors=factors)
    loader = make_pair_loader(src, transform=tiny_transform, tokenize=char_tokenize, batch_size=batch_size, seed=seed,
                              resampled=True, shuffle_buffer=0)
    if state is not None:
        loader.load_state_dict(state)
    captions = []
    for _ in range(steps):
        _, ids = next(loader)
        captions += char_decode(ids)
    return {k: sum(c.startswith(k) for c in captions) for k in ("a", "b")}, captions, loader


def test_factors_weight_the_sources(tmp_path):
    spec = _sources(tmp_path)
    steps = 100  # 800 samples = 200 shard draws
    weighted, _, _ = _counts(spec, [1.0, 3.0], steps)
    uniform, _, _ = _counts(spec, None, steps)
    assert sum(weighted.values()) == sum(uniform.values()) == 800
    # seeded: these exact counts for seed 0 (a 1:3 ratio: 200 and 600 expected; a shard is 4 samples)
    assert weighted == {"a": 192, "b": 608}, weighted
    assert 2.5 < weighted["b"] / weighted["a"] < 3.5
    assert 0.8 < uniform["b"] / uniform["a"] < 1.25, uniform
    assert _counts(spec, [1.0, 3.0], steps)[0] == weighted  # same seed, same stream
    assert _counts(spec, [1.0, 0.0], 10)[0] == {"a": 80, "b": 0}  # factor 0: a source never drawn


def test_loader_state_replays_the_same_stream(tmp_path):
    spec = _sources(tmp_path)
    _, straight, _ = _counts(spec, [1.0, 3.0], 12)
    _, head, loader = _counts(spec, [1.0, 3.0], 5)
    _, tail, _ = _counts(spec, [1.0, 3.0], 7, state=loader.state_dict())
    assert head + tail == straight


def test_training_with_factors_resumes_bit_for_bit(tmp_path, model_json):
    spec = _sources(tmp_path / "data")
    kw = dict(model=model_json, data=spec, resampled=True, train_data_upsampling_factors=[1.0, 3.0], steps=6,
              batch_size=4, lr=2e-3, warmup=1, num_workers=0, save_every=0, log_every=1, deterministic=True,
              progress=False, threads=1)
    train(TrainConfig(out=str(tmp_path / "a"), **kw))
    first = train(TrainConfig(out=str(tmp_path / "b"), **kw), should_stop=lambda step: step == 3)
    assert first["steps_done"] == 3
    assert train(TrainConfig.for_resume(tmp_path / "b", progress=False))["steps_done"] == 6
    a, b = (load_checkpoint(list_checkpoints(tmp_path / r)[-1][1])["model"] for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_factors_are_one_line_errors(tmp_path, model_json, capsys):
    spec = _sources(tmp_path / "data")
    base = ["train", "--model", model_json, "--data", spec, "--steps", "1", "--out", str(tmp_path / "r"),
            "--no-progress", "--resampled"]
    assert main([*base, "--train-data-upsampling-factors", "1::2::3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_data_upsampling_factors" in err[0] and "3 factor(s) for the 2" in err[0], err
    assert main([*base, "--train-data-upsampling-factors", "1::x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-data-upsampling-factors" in err[0], err
    assert main([*base[:-1], "--train-data-upsampling-factors", "1::3"]) == 1  # without --resampled
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_data_upsampling_factors" in err[0] and "resampled" in err[0], err
    with pytest.raises(ValueError, match="train_data_upsampling_factors.*not shards"):
        open_pairs("builtin:scenes?n=8", upsampling_factors=[1.0])
