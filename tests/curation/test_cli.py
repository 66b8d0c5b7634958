"""`clipforge data ...` end to end, including the real model path (a saved micro CLIP)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.cli.main import main
from clipforge.curation import read_decisions
from curation.curationutil import out_keys, pattern, png, write_shard
from curation.test_steps import CORRUPT, balance_pool


def test_cli_queries_balance_reuse_and_errors(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a dog on the grass\n" * 3 + "a cat\n" * 2 + "a pangolin\n")
    q = tmp_path / "queries.txt"
    assert main(["data", "queries", "--corpus", str(corpus), "--min-count", "2", "--no-bigrams", "--out", str(q)]) == 0
    assert [line.split("\t")[0] for line in q.read_text().splitlines()] == ["a", "dog", "grass", "on", "the", "cat"]
    pool = balance_pool(tmp_path / "pool")
    args = ["data", "balance", "--data", pool, "--queries", str(q), "--max-per-query", "2", "--out", str(tmp_path / "b"),
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "balance: 14 pairs in 2 shard(s)" in out and "top queries before: a (" in out
    assert main(args) == 0
    assert "reusing the finished balance run" in capsys.readouterr().out
    assert main([a if a != "2" else "1" for a in args]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["data", "stats", "--data", str(tmp_path / "missing/{00000..00002}.tar"), "--out", str(tmp_path / "s")]) == 1
    assert "no shard file matches" in capsys.readouterr().err
    assert main(["data", "filter", "--data", pool, "--scores", str(tmp_path / "none"), "--min-score", "0.3",
                 "--out", str(tmp_path / "f")]) == 2  # refused while parsing
    assert "argument --scores: folder not found" in capsys.readouterr().err
    assert main(["data", "split", "--data", pool, "--eval-sets", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["data", "score", "--data", pool, "--model", "tiny-vit", "--out", str(tmp_path / "sc")]) == 1
    assert "--random-init" in capsys.readouterr().err


def test_cli_real_model_score_and_dedup(tmp_path, micro_vit, capsys):
    from clipforge.checkpoints import save_model
    from clipforge.inference import embed_images, embed_texts

    ckpt = save_model(micro_vit, tmp_path / "micro.safetensors")
    imgs = {f"m{i}": pattern(i) for i in range(4)}
    caps = {"m0": "a red square", "m1": "a photo of a dog", "m2": "green", "m3": "two cats", "m4": "copy of m0"}
    write_shard(tmp_path / "pool" / "00000.tar", [
        ("m0", png(imgs["m0"]), caps["m0"]), ("m1", png(imgs["m1"]), caps["m1"]),
        ("m4", png(imgs["m0"], compress_level=1), caps["m4"]), ("m9", CORRUPT, "broken")])
    write_shard(tmp_path / "pool" / "00001.tar", [("m2", png(imgs["m2"]), caps["m2"]), ("m3", png(imgs["m3"]), caps["m3"])])
    pool = str(tmp_path / "pool")
    assert main(["data", "score", "--data", pool, "--model", str(ckpt), "--out", str(tmp_path / "sc"), "--batch-size", "3",
                 "--no-progress"]) == 0
    scores = {}
    for f in sorted((tmp_path / "sc").glob("*.scores.npz")):
        with np.load(f) as z:
            scores.update({str(k): float(s) for k, s in zip(z["keys"], z["score"])})
    keys = ["m0", "m1", "m4", "m2", "m3"]
    ie = embed_images(micro_vit, [imgs["m0"], imgs["m1"], imgs["m0"], imgs["m2"], imgs["m3"]]).numpy()
    te = embed_texts(micro_vit, [caps[k] for k in keys]).numpy()
    for k, i, t in zip(keys, ie, te):
        assert scores[k] == pytest.approx(float(i @ t), abs=1e-5)
    assert np.isnan(scores["m9"])
    # near-duplicates through the real model: the pixel-identical copy has cosine 1, the random patterns < 0.999
    assert main(["data", "dedup", "--data", pool, "--model", str(ckpt), "--exact", "none", "--threshold", "0.999",
                 "--out", str(tmp_path / "dd"), "--no-progress"]) == 0
    rows = {r["key"]: r for r in read_decisions(tmp_path / "dd")}
    assert {k for k, r in rows.items() if not r["kept"]} == {"m4", "m9"}
    assert rows["m4"]["reason"] == "near_duplicate" and rows["m4"]["duplicate_of"] == "m0"
    assert out_keys(tmp_path / "dd") == {"m0", "m1", "m2", "m3"}
    rep = json.loads((tmp_path / "dd" / "report.json").read_text())
    assert rep["step_summary"]["near"]["clusters"] == 1
    assert "near: 1 cluster(s), 1 dropped" in capsys.readouterr().out


def test_dedup_reads_clipforge_embed_output(tmp_path, micro_vit):
    """--embeddings with a folder written by clipforge.search's embedder (the real layout)."""
    search_embed = pytest.importorskip("clipforge.search.embed")
    from clipforge.search.sources import open_source

    imgs = [pattern(i) for i in range(3)]
    write_shard(tmp_path / "pool" / "00000.tar", [("e0", png(imgs[0]), "zero"), ("e1", png(imgs[1]), "one")])
    write_shard(tmp_path / "pool" / "00001.tar", [("e2", png(imgs[2]), "two"), ("e3", png(imgs[0], compress_level=0), "copy"),
                                                  ("e4", CORRUPT, "broken")])
    pool = str(tmp_path / "pool")
    search_embed.embed_collection(micro_vit, open_source(data=pool), tmp_path / "emb", shard_size=2, workers=0,
                                  rank=0, world_size=1, progress=False)
    assert main(["data", "dedup", "--data", pool, "--embeddings", str(tmp_path / "emb"), "--exact", "none",
                 "--threshold", "0.999", "--out", str(tmp_path / "dd"), "--no-progress"]) == 0
    rows = {r["key"]: r for r in read_decisions(tmp_path / "dd")}
    assert {k for k, r in rows.items() if not r["kept"]} == {"e3", "e4"}
    assert rows["e3"]["duplicate_of"] == "e0"
    rep = json.loads((tmp_path / "dd" / "report.json").read_text())
    assert rep["step_summary"]["near"]["missing_embeddings"] == 0


def test_cli_filter_refuses_scores_of_other_data(tmp_path, capsys):
    from clipforge.curation import RunOptions, ScoreStep, open_pool, run_step
    from curation.curationutil import ColourEmbedder
    from curation.test_steps import score_pool

    a, b = score_pool(tmp_path / "a"), balance_pool(tmp_path / "b")
    run_step(ScoreStep(ColourEmbedder()), open_pool(b), tmp_path / "b_scores", RunOptions(progress=False))
    code = main(["data", "filter", "--data", a, "--scores", str(tmp_path / "b_scores"), "--min-score", "0.3",
                 "--out", str(tmp_path / "f"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert str(tmp_path / "b_scores") in lines[0] and repr(a) in lines[0] and repr(b) in lines[0]
    assert not (tmp_path / "f").exists()
