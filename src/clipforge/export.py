"""ONNX export of both towers, for serving without PyTorch (ONNX Runtime, TensorRT, CoreML tools).

Each tower is exported as its own graph with a dynamic batch axis (and a dynamic sequence axis for
text, so callers may pass ids trimmed to their longest row, which is exact for the causal text
tower). Outputs are the projected, unnormalised features, exactly as ``encode_image``/``encode_text``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .families import FamilyCLIP
from .models import CLIP


class _ImageTower(nn.Module):
    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


class _TextTower(nn.Module):
    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids)


def export_onnx(model: CLIP, out_dir: str | Path, opset: int = 17) -> dict[str, Path]:
    """Write ``image_encoder.onnx``, ``text_encoder.onnx`` and ``clipforge_config.json`` to ``out_dir``."""
    objective = getattr(model.config, "objective", "contrastive")
    if objective != "contrastive":  # the two encoders would drop the head, the part that makes it work
        raise ValueError(f"ONNX export writes the two CLIP encoders; a model trained with objective "
                         f"{objective!r} is used through its head, which is not exported")
    if isinstance(model, FamilyCLIP):  # timm / HF towers and their tokenizers: not verified under ONNX
        raise ValueError("ONNX export covers clipforge's own CLIP towers; an open_clip family model (timm or "
                         "Hugging Face towers) is not exported: use it through clipforge.load")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    s = model.image_size
    paths = {"image": out / "image_encoder.onnx", "text": out / "text_encoder.onnx"}
    ids = torch.zeros(2, model.context_length, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = 49406, 320, 49407
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks evaluated once
        # Wrappers are built in eval mode: the exporter restores each wrapper's own mode afterwards,
        # and a fresh module (training=True) would leave the model's BatchNorms in training mode.
        torch.onnx.export(_ImageTower(model).eval(), (torch.zeros(2, 3, s, s),), str(paths["image"]),
                          input_names=["pixel_values"], output_names=["image_embeds"], opset_version=opset,
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, dynamo=False)
        torch.onnx.export(_TextTower(model).eval(), (ids,), str(paths["text"]),
                          input_names=["input_ids"], output_names=["text_embeds"], opset_version=opset,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "text_embeds": {0: "batch"}},
                          dynamo=False)
    (out / "clipforge_config.json").write_text(model.config.to_json() + "\n", encoding="utf-8")
    (out / "README.txt").write_text(json.dumps({
        "image_encoder.onnx": "pixel_values float32 [batch, 3, %d, %d] (clipforge preprocess) -> image_embeds" % (s, s),
        "text_encoder.onnx": "input_ids int64 [batch, <=%d] (clipforge.tokenize; may be trimmed after the "
                             "longest row's end-of-text token) -> text_embeds" % model.context_length,
        "note": "embeddings are unnormalised; L2-normalise before cosine similarity"}, indent=2) + "\n")
    return paths
