"""``--precision`` uses open_clip's names with open_clip's meaning, checked against open_clip itself:
the same choices as ``open_clip_train --precision``, the same autocast and input dtype, and the same
weights cast to low precision (``create_model(..., precision=NAME)`` on identical weights)."""

from __future__ import annotations

import re

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
params = pytest.importorskip("open_clip_train.params")
oc_precision = pytest.importorskip("open_clip_train.precision")

from clipforge import device as dv  # noqa: E402
from clipforge.checkpoints.files import native_state_dict  # noqa: E402
from clipforge.checkpoints.openclip import from_native, write  # noqa: E402
from conftest import micro_config  # noqa: E402


def _open_clip_choices(capsys) -> set[str]:
    with pytest.raises(SystemExit):
        params.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    m = re.search(r"--precision \{([a-z0-9_,]+)\}", text)
    assert m, "open_clip_train --help no longer lists --precision choices"
    return set(m.group(1).split(","))


def test_same_names_as_open_clip_train(capsys):
    assert _open_clip_choices(capsys) == set(dv.TRAIN_PRECISIONS)
    assert params.parse_args([]).precision == "amp"  # open_clip's default; ours stays fp32 (CPU-first)


@pytest.mark.parametrize("name", dv.TRAIN_PRECISIONS)
def test_autocast_and_input_dtype_as_open_clip(name):
    ours = dv.get_precision(name)
    theirs = oc_precision.get_autocast(name, device_type="cpu")
    if ours.autocast_dtype is None:
        assert theirs().__class__.__name__ == "suppress"
    else:
        assert theirs.keywords["dtype"] == ours.autocast_dtype
    assert (open_clip.get_input_dtype(name) or torch.float32) == ours.input_dtype
    assert ours.grad_scaler == (name == "amp")  # open_clip_train/main.py: GradScaler only for "amp"


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("name", ["bf16", "fp16", "pure_bf16", "fp32", "amp_bf16"])
def test_same_weights_cast_as_open_clip(tmp_path, kind, name):
    import clipforge

    model = clipforge.create_model(micro_config(kind), seed=1).eval()
    write(model, tmp_path / "oc")
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}", precision=name)
    theirs = {k: v.dtype for k, v in oc_model.state_dict().items()}
    ours = {k: v.dtype for k, v in from_native(native_state_dict(dv.cast_weights(model, name))).items()}
    assert set(ours) <= set(theirs)
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not differ, differ
    low = [k for k, d in ours.items() if d != torch.float32 and d.is_floating_point]
    assert bool(low) == (name not in ("fp32", "amp_bf16"))
