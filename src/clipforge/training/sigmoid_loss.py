"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023): every (image, text) pair of the batch is its
own binary classification, positive on the diagonal, negative elsewhere, with a learned
temperature and bias: ``-1/N_img * sum_ij log sigmoid(z_ij * (t * cos_ij + b))``, ``z = +1`` for the
matching pair, ``-1`` otherwise. Normalised as open_clip's ``SigLipLoss``: divided by the number of
images, not of pairs, so the loss grows with the batch (each image sees more negatives).

Across processes each rank scores its own images against every rank's texts. We all-gather the
text features with gradients (:func:`.distributed.gather_features`, the backward sums every rank's
gradient into the rank that owns the rows) rather than open_clip's neighbour exchange: the gather
is already the tested path of the contrastive loss, one collective instead of ``world_size - 1``,
and the ``[B, N]`` logits it builds are what ``local_loss`` builds too; the exchange only saves
memory at world sizes far above what this package targets. Each rank's loss is its images' sum
divided by its image count, so DDP's average over ranks is the loss of the global batch, and
its averaged gradients are that loss's gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import DistEnv, gather_features

#: The paper's initialisation (Section 3.3): temperature t' = log 10 (t = exp(t') = 10), bias -10,
#: so that at the start the many negatives contribute little and the loss does not spike.
SIGLIP_INIT_LOGIT_SCALE = 2.302585092994046  # log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Images ``[N, D]`` against texts ``[M, D]`` (both L2-normalised; ``M >= N``); image ``i``'s
    positive is text ``i + offset`` (``offset``: where this rank's texts start among all ranks').
    ``logit_scale`` is the multiplier ``exp(t)``. Returns the sum over all pairs / ``N``."""
    n, m = image_features.shape[0], text_features.shape[0]
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image and text features must be [N, D] and [M, D]; got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    if offset < 0 or offset + n > m:
        raise ValueError(f"the {n} images' positives (texts {offset}..{offset + n - 1}) are not among the {m} texts")
    logits = logit_scale * image_features @ text_features.t() + logit_bias  # [N, M]
    signs = -torch.ones_like(logits)
    idx = torch.arange(n, device=logits.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


class SigLipLoss:
    """The sigmoid loss of one rank in a (possibly) data-parallel job: its images against all
    ranks' texts (gathered with gradients), divided by its image count (see the module doc)."""

    def __init__(self, env: DistEnv | None = None) -> None:
        self.env = env or DistEnv()

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"image and text features must both be [N, D]; got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        env = self.env
        if not env.distributed:
            return sigmoid_loss(image_features, text_features, logit_scale, logit_bias)
        all_txt = gather_features(text_features, env, with_grad=True)  # [world * B, D], rank order
        return sigmoid_loss(image_features, all_txt, logit_scale, logit_bias, offset=env.rank * text_features.shape[0])


__all__ = ["SigLipLoss", "sigmoid_loss", "SIGLIP_INIT_LOGIT_SCALE", "SIGLIP_INIT_LOGIT_BIAS"]
