"""``serve --runtime onnx``: the model's two towers exported to ONNX (:func:`clipforge.export.export_onnx`)
and run by ONNX Runtime, behind the same ``encode_text`` / ``encode_image`` the service calls.

:class:`OnnxCLIP` keeps the torch model's config, ``logit_scale`` (and ``logit_bias``) for
``/rank``, and answers ``state_dict()`` with the checkpoint's tensors so the index's weights check
still recognises the model. Text ids are trimmed after the batch's last end-of-text token before
the text graph runs (exact: the text tower is causal; the graph has a dynamic sequence axis).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..export import export_onnx
from ..precision import lowest_weight_dtype


class OnnxCLIP(nn.Module):
    """A CLIP whose towers run in ONNX Runtime sessions (CPU, fp32)."""

    def __init__(self, model: nn.Module, onnx_dir: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # heavy optional dependency: loaded when serving with --runtime onnx

        super().__init__()
        self.config = model.config
        self.logit_scale = nn.Parameter(model.logit_scale.detach().float().clone(), requires_grad=False)
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else nn.Parameter(torch.as_tensor(bias).detach().float().clone(),
                                                                 requires_grad=False)
        self._context_length = int(model.context_length)
        self._image_size = int(model.image_size)
        self._source = [model]  # not a submodule: its tensors answer state_dict(), nothing runs through it
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        d = Path(onnx_dir)
        self.image_session = ort.InferenceSession(str(d / "image_encoder.onnx"), opts,
                                                  providers=["CPUExecutionProvider"])
        self.text_session = ort.InferenceSession(str(d / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.eval()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def image_size(self) -> int:
        return self._image_size

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self._source[0].state_dict(*args, **kwargs)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]  # [B, L']: the EOT (largest id) ends each row
        out = torch.from_numpy(self.text_session.run(None, {"input_ids": ids.cpu().numpy().astype(np.int64)})[0])
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = images.detach().float().cpu().contiguous().numpy()
        out = torch.from_numpy(self.image_session.run(None, {"pixel_values": x})[0])
        return nn.functional.normalize(out, dim=-1) if normalize else out


def onnx_model(model: nn.Module, onnx_dir: str | Path | None = None, threads: int | None = None) -> OnnxCLIP:
    """Export ``model``'s towers (to ``onnx_dir``, or a temporary folder) and wrap them in ORT sessions."""
    if lowest_weight_dtype(model) != torch.float32:
        raise ValueError("--runtime onnx serves the fp32 towers: use --precision fp32 with it")
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="clipforge-onnx-")
        export_onnx(model, tmp.name)
        wrapped = OnnxCLIP(model, tmp.name, threads)
        wrapped._tmp = tmp  # type: ignore[attr-defined]  # the files live as long as the sessions
        return wrapped
    if not (Path(onnx_dir) / "text_encoder.onnx").is_file():
        export_onnx(model, onnx_dir)
    return OnnxCLIP(model, onnx_dir, threads)
