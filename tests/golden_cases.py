"""Fixed-seed models and inputs for the golden regression test (shared with scripts/make_golden.py)."""

from __future__ import annotations

import torch

from clipforge import create_model, tokenize
from conftest import micro_config

CASES = ["vit_quickgelu", "vit_gelu", "resnet"]
TEXTS = ["a photo of a dog", "two red squares to the left of a blue circle", "", "über café 東京 😀 &amp;"]


def build_case(name: str):
    kind = "resnet" if name == "resnet" else "vit"
    act = "gelu" if name == "vit_gelu" else "quick_gelu"
    cfg = micro_config(kind, activation=act)
    model = create_model(cfg).eval()
    g = torch.Generator().manual_seed(1234)
    # Weights drawn here from one seeded generator (not from the init code), so the golden
    # outputs pin the forward numerics only; norms and biases get non-trivial values too.
    with torch.no_grad():
        for key, t in sorted(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            if key.endswith("running_var"):
                t.copy_(1 + 0.2 * torch.rand(t.shape, generator=g))
            elif t.dim() == 1 or key.endswith("running_mean"):
                base = 1.0 if key.endswith((".weight",)) and "ln" in key or "bn" in key.split(".")[-2] else 0.0
                t.copy_(base + 0.05 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * fan_in ** -0.5)
        model.logit_scale.fill_(2.5)
    size = cfg.vision.image_size
    images = torch.randn(4, 3, size, size, generator=g)
    return model, images, tokenize(TEXTS)


def compute_case(name: str) -> dict[str, torch.Tensor]:
    """The plain model's outputs for a case, computed on one thread (a BLAS may split a product's
    sums differently with more threads, so the thread count is fixed rather than recorded)."""
    model, images, ids = build_case(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return {"image": model.encode_image(images), "text": model.encode_text(ids),
                    "logits": model(images, ids)[0]}
    finally:
        torch.set_num_threads(threads)
