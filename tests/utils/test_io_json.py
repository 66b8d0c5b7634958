"""jsonable: the one NumPy/path -> JSON conversion behind write_json, append_jsonl, eval records
and curation decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.utils import append_jsonl, jsonable, read_json, torch_threads, write_json


def test_jsonable_converts_numpy_paths_and_non_finite():
    obj = {"a": np.float32(0.5), "b": np.int64(3), "c": np.arange(3), "d": (1, np.bool_(True)),
           "e": float("nan"), "f": [np.float64("inf"), -math.inf], 7: Path("x/y"), "g": np.array([[1.5, np.nan]])}
    out = jsonable(obj)
    assert out == {"a": 0.5, "b": 3, "c": [0, 1, 2], "d": [1, True], "e": None, "f": [None, None], "7": "x/y",
                   "g": [[1.5, None]]}
    assert type(out["b"]) is int and type(out["d"][1]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON
    with pytest.raises(TypeError, match="not JSON serialisable: set"):
        jsonable({"s": {1, 2}})


def test_written_json_is_strict(tmp_path):
    write_json(tmp_path / "r.json", {"loss": float("nan"), "acc": np.float32(0.25)})
    assert "NaN" not in (tmp_path / "r.json").read_text()
    assert read_json(tmp_path / "r.json") == {"loss": None, "acc": 0.25}
    append_jsonl(tmp_path / "m.jsonl", {"step": np.int32(1), "x": np.float16(2.0)})
    append_jsonl(tmp_path / "m.jsonl", {"step": 2, "x": math.inf})
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "x": 2.0}, {"step": 2, "x": None}]


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with torch_threads(None), torch_threads(0):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("restored on error too")
    assert torch.get_num_threads() == before
