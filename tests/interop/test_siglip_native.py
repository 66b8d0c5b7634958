"""The native SigLIP towers (clipforge.models.siglip) against timm and open_clip themselves:
random weights of open_clip's ``ViT-B-16-SigLIP`` (timm's ``vit_base_patch16_siglip_224`` image
tower, open_clip's bidirectional last-token text tower), mapped by ``checkpoints.siglip``; image and
text features within 1e-4 of the feature scale, equal logit scale and bias, and back to open_clip keys.

Run with ``/opt/clipforge-interop/bin/python -m pytest tests/interop/test_siglip_native.py``.
"""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from clipforge import fast  # noqa: E402
from clipforge.checkpoints import siglip as siglip_format  # noqa: E402
from clipforge.checkpoints.strict import load_state_dict_strict  # noqa: E402
from clipforge.models import create_model  # noqa: E402

pytestmark = pytest.mark.slow  # ViT-B/16 at 224 px through both libraries: ~3 min on a loaded 2-core CPU


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    err = float((ours - theirs).abs().max()) / float(theirs.abs().max())
    assert err <= 1e-4, err


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    with torch.no_grad():  # open_clip zero-inits some tensors: give every one a random value
        for p in oc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = oc.state_dict()
    model_cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    assert siglip_format.is_siglip_model_cfg(model_cfg) and siglip_format.is_siglip_layout(sd)
    cfg = siglip_format.config_from_openclip(model_cfg, sd)
    with torch.device("meta"):
        ours = create_model(cfg)
    ours = ours.to_empty(device="cpu")
    load_state_dict_strict(ours, siglip_format.to_native(sd), "open_clip ViT-B-16-SigLIP")
    return oc, ours.eval(), sd


def test_image_tower_equals_timm(pair):
    oc, ours, _ = pair
    assert isinstance(oc.visual.trunk, timm.models.vision_transformer.VisionTransformer)
    assert oc.visual.trunk.default_cfg["architecture"] == "vit_base_patch16_siglip_224"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = oc.encode_image(x)
        _close(ours.encode_image(x), theirs)
        _close(fast.enable(ours, pack=True).encode_image(x), theirs)
        fast.disable(ours)


def test_text_tower_scale_and_bias_equal_open_clip(pair):
    oc, ours, _ = pair
    ids = torch.randint(1, 32000, (3, 64), generator=torch.Generator().manual_seed(2))
    ids[0, 10:] = 1  # a padded row: the last position is still pooled, padding attended
    with torch.no_grad():
        theirs = oc.encode_text(ids)
        _close(ours.encode_text(ids), theirs)
        _close(fast.enable(ours, pack=True).encode_text(ids), theirs)
        fast.disable(ours)
    assert ours.logit_scale.item() == oc.logit_scale.item() and ours.logit_bias.item() == oc.logit_bias.item()


def test_keys_map_back_to_open_clip(pair):
    oc, ours, sd = pair
    back = siglip_format.from_native(ours.state_dict())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    oc.load_state_dict(back, strict=True)
