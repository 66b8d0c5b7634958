"""Each step removes exactly what it should: planted bad samples, skewed queries, mismatched
captions, exact and near duplicates, evaluation-set copies. Kept/dropped key sets are asserted
exactly, and kept samples are byte-identical copies of the input members."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.curation import (BalanceStep, DecontamStep, DedupStep, FilterStep, ScoreStep, ScoreTable, StatsStep,
                                open_pool, read_decisions, run_step, write_embeddings)
from clipforge.curation.decontam import iter_eval_images
from curation.curationutil import (ColourEmbedder, TinyImageEmbedder, near_copy, out_keys, pattern, png,
                                   read_shard_members, solid, write_shard)

CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def dropped(out, reason=None) -> set[str]:
    return {r["key"] for r in read_decisions(out) if not r["kept"] and (reason is None or r["reason"] == reason)}


def kept(out) -> set[str]:
    return {r["key"] for r in read_decisions(out) if r["kept"]}


# ----------------------------------------------------------------------------- stats
def test_stats_counts_languages_sizes_and_bad_samples(tmp_path, opts):
    write_shard(tmp_path / "pool" / "00000.tar", [
        ("s0", png(solid("red")), "a dog on the beach"),
        ("s1", png(solid("blue", (16, 8))), "un perro en la playa"),
        ("s2", png(solid("green")), "一只狗在海滩上"),
        ("s3", CORRUPT, "a broken image"),
    ])
    write_shard(tmp_path / "pool" / "00001.tar", [
        ("s4", png(solid("white", (16, 8))), "собака на пляже"),
        ("s5", png(solid("black")), None),                   # no caption at all
        ("s6", png(solid("red")), '["two captions here", "and the second one"]'),
    ])
    rep = run_step(StatsStep(), open_pool(str(tmp_path / "pool")), tmp_path / "stats", opts())
    s = rep["step_summary"]
    assert (s["samples"], s["good_samples"], s["bad_samples"]) == (7, 5, 2)
    assert s["bad_by_reason"] == {"decode_error": 1, "missing_caption": 1}
    assert s["captions"] == 6
    assert {k: v["captions"] for k, v in s["languages"].items()} == {"en": 3, "latin": 1, "zh": 1, "cyrillic": 1}
    assert s["width"]["min"] == 8 and s["width"]["max"] == 16 and s["top_sizes"] == {"8x8": 3, "16x8": 2}
    assert s["captions_per_sample"]["max"] == 2
    assert (s["caption_words"]["min"], s["caption_words"]["max"]) == (1, 5)  # unspaced Chinese is one \w+ run
    assert json.loads((tmp_path / "stats" / "stats.json").read_text())["samples"] == 7
    assert rep["bad_samples"]["total"] == 2 and {e["key"] for e in rep["bad_samples"]["examples"]} == {"s3", "s5"}


# ----------------------------------------------------------------------------- balance
QUERIES = ["dog", "cat", "pangolin", "red panda", "unicorn"]


def balance_pool(root):
    img = png(solid("green"))
    write_shard(root / "00000.tar", [
        ("a00", img, "a dog on the grass"), ("a01", img, "A DOG running"), ("a02", img, "dog and a pangolin"),
        ("a03", img, "a cat"), ("a04", img, "a red-panda eating"), ("a05", img, "nothing here"),
        ("a06", CORRUPT, "a dog with a broken image"),
    ])
    write_shard(root / "00001.tar", [
        ("b00", img, "dog dog dog"), ("b01", img, "a dog"), ("b02", img, "the cat and the dog"),
        ("b03", img, "category of dogs"), ("b04", img, "hotdog stand"), ("b05", img, "a pangolin"), ("b06", img, "dog"),
    ])
    return str(root)


def test_balance_caps_rarest_query_first(tmp_path, opts):
    pool = open_pool(balance_pool(tmp_path / "pool"))
    rep = run_step(BalanceStep(QUERIES, max_per_query=2), pool, tmp_path / "bal", opts())
    out = tmp_path / "bal"
    # counts: dog 7 (a00 a01 a02 b00 b01 b02 b06), cat 2, pangolin 2, red panda 1; a02 -> pangolin, b02 -> cat
    assert kept(out) == {"a00", "a01", "a02", "a03", "a04", "b02", "b05"}
    assert dropped(out, "over_cap") == {"b00", "b01", "b06"}
    assert dropped(out, "no_query") == {"a05", "b03", "b04"}
    assert dropped(out, "decode_error") == {"a06"}
    assert out_keys(out) == kept(out)
    rows = {r["key"]: r for r in read_decisions(out)}
    assert rows["a02"]["query"] == "pangolin" and rows["b02"]["query"] == "cat" and rows["a04"]["query"] == "red panda"
    hist = {h["query"]: h for h in json.loads((out / "query_histogram.json").read_text())}
    assert {q: h["pairs_before"] for q, h in hist.items()} == {"dog": 7, "cat": 2, "pangolin": 2, "red panda": 1, "unicorn": 0}
    # dog keeps 2 pairs charged to it, but kept pairs charged to rarer queries mention dog too (a02, b02)
    assert {q: h["pairs_after"] for q, h in hist.items()} == {"dog": 4, "cat": 2, "pangolin": 2, "red panda": 1, "unicorn": 0}
    assert {q: h["kept_as_rarest"] for q, h in hist.items()} == {"dog": 2, "cat": 2, "pangolin": 2, "red panda": 1, "unicorn": 0}
    assert {q: h["rarest_before"] for q, h in hist.items()} == {"dog": 5, "cat": 2, "pangolin": 2, "red panda": 1, "unicorn": 0}
    csv_lines = (out / "query_histogram.csv").read_text().splitlines()
    assert csv_lines[0] == "query,pairs_before,pairs_after,rarest_before,kept_as_rarest" and csv_lines[1] == "dog,7,4,5,2"
    s = rep["step_summary"]
    assert s["top_before"][0] == {"query": "dog", "pairs": 7}
    assert s["before"]["queries_with_pairs"] == 4 and s["before"]["max"] == 7 and s["after"]["max"] == 4
    assert s["queries_at_cap"] == 3 and s["after"]["gini"] < s["before"]["gini"]
    assert (s["charged_before"]["max"], s["charged_after"]["max"]) == (5, 2)
    assert rep["kept"] == 7 and rep["dropped_by_reason"] == {"decode_error": 1, "no_query": 3, "over_cap": 3}


def test_balance_hash_order_is_a_deterministic_subset(tmp_path, opts):
    pool = balance_pool(tmp_path / "pool")
    run_step(BalanceStep(QUERIES, max_per_query=2, order="hash", seed=3), open_pool(pool), tmp_path / "h1", opts())
    run_step(BalanceStep(QUERIES, max_per_query=2, order="hash", seed=3), open_pool(pool), tmp_path / "h2", opts())
    k = kept(tmp_path / "h1")
    assert k == kept(tmp_path / "h2")
    dogs = {"a00", "a01", "b00", "b01", "b06"}  # the pairs charged to "dog"
    assert len(k & dogs) == 2 and k - dogs == {"a02", "a03", "a04", "b02", "b05"}


# ----------------------------------------------------------------------------- score + filter
def score_pool(root):
    write_shard(root / "00000.tar", [
        ("r1", png(solid("red")), "a red square"),
        ("r2", png(solid("blue")), "a red car"),                 # mismatch: scores 0
        ("r3", png(solid("green")), "green field"),
    ])
    write_shard(root / "00001.tar", [
        ("r4", png(solid("yellow")), "a photo"),                 # caption names no colour: 0
        ("r5", CORRUPT, "a red thing"),
        ("r6", png(solid("blue")), '["a red sky", "a blue sky"]'),  # several captions: the best one counts
    ])
    return str(root)


def test_score_then_filter_drops_mismatched_captions(tmp_path, opts):
    pool = score_pool(tmp_path / "pool")
    emb = ColourEmbedder()
    rep = run_step(ScoreStep(emb, batch_size=2), open_pool(pool), tmp_path / "scores", opts())
    assert rep["kept"] == 5 and rep["dropped_by_reason"] == {"decode_error": 1}
    with np.load(tmp_path / "scores" / "00000.scores.npz") as z:
        assert dict(zip(z["keys"], z["score"])) == {"r1": 1.0, "r2": 0.0, "r3": 1.0}
    with np.load(tmp_path / "scores" / "00001.scores.npz") as z:
        got = dict(zip(z["keys"], z["score"]))
        assert got["r4"] == 0.0 and got["r6"] == 1.0 and np.isnan(got["r5"])
        assert dict(zip(z["keys"], z["score_mean"]))["r6"] == 0.5
    assert (tmp_path / "scores" / "scores.parquet").exists()
    assert not list((tmp_path / "scores").glob("*.tar"))
    rep = run_step(FilterStep(ScoreTable(tmp_path / "scores"), min_score=0.5), open_pool(pool), tmp_path / "filtered", opts())
    out = tmp_path / "filtered"
    assert kept(out) == {"r1", "r3", "r6"} == out_keys(out)
    assert dropped(out, "low_score") == {"r2", "r4"} and dropped(out, "decode_error") == {"r5"}
    assert rep["step_summary"]["kept_scores"]["n"] == 3 and rep["step_summary"]["dropped_scores"]["max"] == 0.0
    # kept samples are the original members, byte for byte
    src, dst = read_shard_members(tmp_path / "pool" / "00001.tar"), read_shard_members(out / "00001.tar")
    assert set(dst) == {"r6.png", "r6.txt", "r6.json"} and all(dst[n] == src[n] for n in dst)
    assert json.loads((out / "00001_stats.json").read_text())["successes"] == 1
    # the same contents under other names (a moved / renamed copy): accepted, scores found by key
    import shutil
    (tmp_path / "renamed").mkdir()
    shutil.copy(tmp_path / "pool" / "00000.tar", tmp_path / "renamed" / "part-a.tar")
    shutil.copy(tmp_path / "pool" / "00001.tar", tmp_path / "renamed" / "part-b.tar")
    rep = run_step(FilterStep(ScoreTable(tmp_path / "scores"), min_score=0.5), open_pool(str(tmp_path / "renamed")),
                   tmp_path / "filtered2", opts())
    assert kept(tmp_path / "filtered2") == {"r1", "r3", "r6"}
    assert rep["step_summary"]["no_score"] == 0


def test_filter_refuses_scores_of_other_data(tmp_path, opts):
    """Scores apply by key, and keys repeat across datasets: scores of B must never filter A."""
    pool = score_pool(tmp_path / "pool")
    run_step(ScoreStep(ColourEmbedder(), batch_size=2), open_pool(pool), tmp_path / "scores", opts())
    ident = json.loads((tmp_path / "scores" / "data.json").read_text())
    assert ident["data"] == pool and ident["count"] == 6 and len(ident["inputs"]) == 2
    # same keys, one shard with other contents (a different dataset keyed alike)
    (tmp_path / "other").mkdir()
    import shutil
    shutil.copy(tmp_path / "pool" / "00000.tar", tmp_path / "other" / "00000.tar")
    write_shard(tmp_path / "other" / "00001.tar", [("r4", png(solid("red")), "a red photo"),
                                                   ("r5", png(solid("red")), "a red thing"),
                                                   ("r6", png(solid("red")), "red")])
    with pytest.raises(ValueError) as e:
        run_step(FilterStep(ScoreTable(tmp_path / "scores"), min_score=0.5), open_pool(str(tmp_path / "other")),
                 tmp_path / "f", opts())
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "scores") in msg and repr(pool) in msg
    assert repr(str(tmp_path / "other")) in msg and "clipforge data score" in msg
    assert not (tmp_path / "f").exists()  # refused before anything was written
    # scores written before the data record existed: refused, asking for a re-score
    (tmp_path / "scores" / "data.json").unlink()
    with pytest.raises(ValueError, match="do not record which data.*re-run `clipforge data score --force`"):
        ScoreTable(tmp_path / "scores")


def test_filter_needs_a_finished_score_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores folder not found"):
        ScoreTable(tmp_path / "nope")
    (tmp_path / "s").mkdir()
    with pytest.raises(FileNotFoundError, match="not a score run"):
        ScoreTable(tmp_path / "s")


# ----------------------------------------------------------------------------- dedup
def dedup_pool(root):
    p = {i: pattern(i) for i in range(5)}
    write_shard(root / "00000.tar", [
        ("k05", png(p[0], compress_level=1), "another caption"),  # same pixels as k01, other bytes and caption
        ("k02", png(p[2]), "pattern two"),
        ("k07", png(near_copy(p[1], 7)), "noisy one"),             # near k03
        ("k09", CORRUPT, "broken"),
    ])
    write_shard(root / "00001.tar", [
        ("k01", png(p[0]), "pattern zero"),
        ("k03", png(p[1]), "pattern one"),
        ("k04", png(p[3]), "pattern three"),
        ("k06", png(p[4]), "pattern four"),
        ("k08", png(near_copy(p[2], 8, size=40)), "noisy resized two"),  # near k02
    ])
    return str(root)


def test_dedup_exact_and_near_keep_first_key(tmp_path, opts):
    pool = dedup_pool(tmp_path / "pool")
    rep = run_step(DedupStep(exact="image", threshold=0.9, embedder=TinyImageEmbedder()), open_pool(pool),
                   tmp_path / "dd", opts())
    out = tmp_path / "dd"
    assert kept(out) == {"k01", "k02", "k03", "k04", "k06"} == out_keys(out)
    rows = {r["key"]: r for r in read_decisions(out)}
    assert rows["k05"]["reason"] == "exact_duplicate" and rows["k05"]["duplicate_of"] == "k01"  # sorted key wins, not first seen
    assert rows["k07"]["reason"] == "near_duplicate" and rows["k07"]["duplicate_of"] == "k03"
    assert rows["k08"]["reason"] == "near_duplicate" and rows["k08"]["duplicate_of"] == "k02"
    assert 0.9 <= rows["k07"]["similarity"] < 1.0
    assert rows["k09"]["reason"] == "decode_error"
    s = rep["step_summary"]
    assert s["exact"]["clusters"] == 1 and s["exact"]["dropped"] == 1
    assert s["near"]["clusters"] == 2 and s["near"]["dropped"] == 2 and s["near"]["index"] == "flat"
    import pyarrow.parquet as pq
    table = pq.read_table(out / "decisions.parquet").to_pylist()
    assert {r["key"]: (r["kept"], r["reason"]) for r in table} == {k: (r["kept"], r["reason"]) for k, r in rows.items()}
    assert json.loads(next(r for r in table if r["key"] == "k07")["details"])["duplicate_of"] == "k03"
    assert rep["files"]["decisions"] == str(out / "decisions.parquet")
    clusters = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    assert {(c["kind"], c["kept"], tuple(c["duplicates"])) for c in clusters} == {
        ("exact", "k01", ("k05",)), ("near", "k03", ("k07",)), ("near", "k02", ("k08",))}


def test_dedup_exact_modes_and_precomputed_embeddings(tmp_path, opts):
    pool = dedup_pool(tmp_path / "pool")
    # pixels + caption: k05 has another caption, so nothing is an exact pair duplicate
    run_step(DedupStep(exact="pair"), open_pool(pool), tmp_path / "pair", opts())
    assert dropped(tmp_path / "pair") == {"k09"}
    # exact by pixels only, no embeddings: the near copies stay
    run_step(DedupStep(exact="image"), open_pool(pool), tmp_path / "img", opts())
    assert dropped(tmp_path / "img") == {"k05", "k09"}
    # near duplicates from an embeddings folder (clipforge embed layout); k06 deliberately missing
    from PIL import Image
    import io
    import tarfile
    keys, images = [], []
    for shard in sorted((tmp_path / "pool").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png") and not m.name.startswith(("k09", "k06")):
                    keys.append(m.name.split(".")[0])
                    images.append(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
    e = TinyImageEmbedder().embed_images(images)
    write_embeddings(tmp_path / "emb", keys[:3], e[:3], part=0)
    write_embeddings(tmp_path / "emb", keys[3:], e[3:], part=1)
    rep = run_step(DedupStep(exact="none", threshold=0.9, embeddings=tmp_path / "emb"), open_pool(pool),
                   tmp_path / "near", opts())
    assert dropped(tmp_path / "near", "near_duplicate") == {"k05", "k07", "k08"}  # k05 is an identical image: cosine 1
    assert rep["step_summary"]["near"]["missing_embeddings"] == 1


def test_dedup_caption_mode(tmp_path, opts):
    write_shard(tmp_path / "pool" / "00000.tar", [
        ("c1", png(pattern(1)), "A dog, running!"), ("c2", png(pattern(2)), "a dog running"), ("c3", png(pattern(3)), "a cat"),
    ])
    run_step(DedupStep(exact="caption"), open_pool(str(tmp_path / "pool")), tmp_path / "cap", opts())
    assert dropped(tmp_path / "cap") == {"c2"}


def test_dedup_ivf_and_numpy_paths_agree_with_flat(tmp_path, opts):
    pool = dedup_pool(tmp_path / "pool")
    results = {}
    for index in ("flat", "ivf", "numpy"):
        run_step(DedupStep(exact="none", threshold=0.9, embedder=TinyImageEmbedder(), index=index, nprobe=64),
                 open_pool(pool), tmp_path / index, opts())
        results[index] = dropped(tmp_path / index)
    assert results["flat"] == results["ivf"] == results["numpy"] == {"k05", "k07", "k08", "k09"}


# ----------------------------------------------------------------------------- split (decontamination)
def eval_sets(root):
    ev1 = root / "ev_folder"
    (ev1 / "sub").mkdir(parents=True)
    pattern(10).save(ev1 / "e10.png")
    pattern(11).save(ev1 / "e11.png")
    pattern(12).save(ev1 / "sub" / "e12.png")
    (ev1 / "broken.png").write_bytes(CORRUPT)
    ev2 = root / "ev_arrays.npz"
    np.savez(ev2, images=np.stack([np.asarray(pattern(13)), np.asarray(pattern(14))]), labels=np.array([0, 1]))
    return [str(ev1), str(ev2)]


def split_pool(root):
    write_shard(root / "00000.tar", [
        ("t1", png(pattern(10), compress_level=2), "copy of an eval image"),
        ("t2", png(near_copy(pattern(11), 2)), "near copy of an eval image"),
        ("t3", png(near_copy(pattern(13), 3)), "near copy of an npz eval image"),
    ])
    write_shard(root / "00001.tar", [
        ("t4", png(pattern(20)), "clean"), ("t5", png(pattern(21)), "clean too"),
        ("t6", png(pattern(14)), "exact copy of an npz image"), ("t7", CORRUPT, "broken"),
    ])
    return str(root)


def test_split_removes_eval_duplicates_and_reports_overlap(tmp_path, opts):
    evs = eval_sets(tmp_path)
    pool = split_pool(tmp_path / "pool")
    rep = run_step(DecontamStep(evs, embedder=TinyImageEmbedder(), threshold=0.9), open_pool(pool), tmp_path / "clean", opts())
    out = tmp_path / "clean"
    assert kept(out) == {"t4", "t5"} == out_keys(out)
    assert dropped(out, "eval_duplicate") == {"t1", "t2", "t3", "t6"} and dropped(out, "decode_error") == {"t7"}
    rows = {r["key"]: r for r in read_decisions(out)}
    assert (rows["t1"]["eval_set"], rows["t1"]["eval_key"], rows["t1"]["matches"][0]["exact"]) == ("ev_folder", "e10.png", True)
    assert (rows["t3"]["eval_set"], rows["t3"]["eval_key"]) == ("ev_arrays", "ev_arrays.npz[0]")
    assert rows["t3"]["matches"][0]["exact"] is False and rows["t6"]["matches"][0]["exact"] is True
    per = rep["step_summary"]["eval_sets"]
    assert per["ev_folder"]["eval_images"] == 4 and per["ev_folder"]["unreadable_eval_images"] == 1
    assert per["ev_folder"]["eval_images_with_duplicates"] == 2 and per["ev_folder"]["overlap_fraction"] == pytest.approx(2 / 3, abs=1e-5)
    assert per["ev_arrays"]["eval_images_with_duplicates"] == 2 and per["ev_arrays"]["overlap_fraction"] == 1.0
    assert (per["ev_folder"]["exact"], per["ev_folder"]["near"]) == (1, 1)
    lines = [json.loads(x) for x in (out / "overlap.jsonl").read_text().splitlines()]
    assert sorted(x["train_key"] for x in lines) == ["t1", "t2", "t3", "t6"]
    # without a model only pixel-identical copies are found
    run_step(DecontamStep(evs), open_pool(pool), tmp_path / "exact_only", opts())
    assert dropped(tmp_path / "exact_only", "eval_duplicate") == {"t1", "t6"}


def test_eval_sets_from_shards_and_manifest(tmp_path):
    write_shard(tmp_path / "ev" / "00000.tar", [("x1", png(pattern(1)), None), ("x2", CORRUPT, None)])
    got = list(iter_eval_images(str(tmp_path / "ev" / "00000.tar")))
    assert [(k, im is not None, err) for k, im, err in got] == [("x1", True, ""), ("x2", False, "decode_error")]
    pattern(2).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,label\na.png,0\nmissing.png,1\n")
    got = list(iter_eval_images(str(tmp_path / "m.csv")))
    assert [(k, im is not None, err) for k, im, err in got] == [("a.png", True, ""), ("missing.png", False, "missing_file")]
    with pytest.raises(FileNotFoundError):
        DecontamStep([str(tmp_path / "nope.npz")])
