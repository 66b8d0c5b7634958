"""`clipforge embed | index | search` end to end through the CLI (in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.checkpoints import save_model
from clipforge.cli.main import main
from clipforge.inference import embed_images, embed_texts
from clipforge.preprocess import load_image
from search.searchutil import make_image_folder, micro_model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = micro_model()
    ckpt = save_model(model, d / "micro.safetensors")
    facts = make_image_folder(d / "photos")
    assert main(["embed", "--model", str(ckpt), "--images", str(d / "photos"), "--out", str(d / "emb"),
                 "--shard-size", "6", "--no-progress"]) == 0
    assert main(["index", "--embeddings", str(d / "emb"), "--out", str(d / "idx"), "--no-progress"]) == 0
    return d, model, ckpt, facts


def _ranking(model, d, q: np.ndarray, k: int) -> list[str]:
    keys = sorted(p.relative_to(d / "photos").as_posix() for p in (d / "photos").rglob("img_*.*")
                  if p.suffix != ".txt")
    base = embed_images(model, [load_image(d / "photos" / k_) for k_ in keys]).numpy()
    base = base.astype(np.float16).astype(np.float32)
    return [keys[i] for i in np.argsort(-(base @ q), kind="stable")[:k]]


def test_search_text_json(built, capsys):
    d, model, ckpt, _ = built
    capsys.readouterr()
    assert main(["search", "--index", str(d / "idx"), "--model", str(ckpt), "a dog on a beach", "-k", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == {"type": "text", "text": "a dog on a beach"} and len(out["results"]) == 4
    q = embed_texts(model, ["a dog on a beach"]).numpy()[0]
    assert [r["key"] for r in out["results"]] == _ranking(model, d, q, 4)
    assert all({"id", "score", "key", "image_path", "width", "height"} <= set(r) for r in out["results"])


def test_search_image_table(built, capsys):
    d, _, ckpt, facts = built
    key = sorted(facts["sizes"])[5]
    capsys.readouterr()
    assert main(["search", "--index", str(d / "idx"), "--model", str(ckpt), "--image", str(d / "photos" / key),
                 "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "id", "key", "/", "caption"] and len(lines) == 4
    first = lines[1].split()
    assert first[0] == "1" and first[3] == key and float(first[1]) > 0.999


def test_search_errors(built, capsys):
    d, _, ckpt, _ = built
    capsys.readouterr()
    assert main(["search", "--index", str(d / "idx"), "--model", str(ckpt)]) == 1
    assert "exactly one" in capsys.readouterr().err
    assert main(["search", "--index", str(d / "nope"), "--model", str(ckpt), "dog"]) == 2  # refused while parsing
    assert "argument --index: folder not found" in capsys.readouterr().err
    assert main(["search", "--index", str(d / "idx"), "--model", str(ckpt), "dog " * 80]) == 1
    assert "82 tokens" in capsys.readouterr().err
    # another architecture (other embedding width) cannot query this index
    assert main(["search", "--index", str(d / "idx"), "--model", "tiny-vit", "--random-init", "dog"]) == 1
    assert "use the model that built it" in capsys.readouterr().err


def test_index_add_and_json_report(built, tmp_path, capsys):
    d, model, ckpt, _ = built
    more = tmp_path / "more"
    make_image_folder(more, n_good=5)
    assert main(["embed", "--model", str(ckpt), "--images", str(more), "--out", str(tmp_path / "emb2"),
                 "--no-progress"]) == 0
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(d / "idx", idx)
    capsys.readouterr()
    assert main(["index", "--embeddings", str(tmp_path / "emb2"), "--out", str(idx), "--add", "--json",
                 "--no-progress"]) == 0
    rep = json.loads(capsys.readouterr().out)
    n0 = json.loads((d / "idx" / "index.json").read_text())["ntotal"]
    assert rep["added"] == 5 and rep["ntotal"] == n0 + 5
    assert main(["index", "--embeddings", str(d / "emb"), "--out", str(tmp_path / "i2"), "--max-memory", "10",
                 "--no-progress"]) == 1
    assert "do not fit" in capsys.readouterr().err
