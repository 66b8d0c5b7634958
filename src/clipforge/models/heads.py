"""The paper's two baseline objectives as models, CLIP plus a ``head`` (Radford et al. 2021,
section 2.3 and Figure 2): the same image tower as CLIP, trained to predict the caption instead of matching it.

- :class:`BagOfWordsCLIP` (``objective="bow"``): a linear head from the unit-norm image embedding
  to the BPE vocabulary; its softmax is trained towards the caption's normalised bag of tokens.
- :class:`CaptioningCLIP` (``objective="caption"``): CLIP's causal text Transformer used as a
  caption decoder conditioned on the image (the simpler of the VirTex-like designs): a linear
  ``head`` maps the unit-norm image embedding to one token, which takes the place of the
  start-of-text token at position 0 (a constant, so nothing is lost); position ``t`` then predicts
  token ``t + 1``, with output embeddings tied to the token embeddings.

Both are subclasses of :class:`~clipforge.models.CLIP` with one extra module, ``head``: the same
config (``CLIPConfig.objective`` says which), image tower, fast paths (``clipforge.fast`` swaps
the same module classes), precision handling and checkpoint format (the state dict is CLIP's plus
``head.*``; ``load_model`` builds the class ``config.objective`` names). Parameters an objective
never uses are listed by ``unused_parameter_names`` (bow: the whole text tower and the
temperature; caption: the text projection and the temperature); training freezes them, so the
optimiser keeps no state for them and DDP does not wait for their gradients. They stay in the
checkpoint so the model remains a CLIP for every loader; a bow model's text tower is dead weight.

Both heads read the **unit-norm** image embedding (``encode_image(x, normalize=True)``), the
same feature the contrastive model compares with text, so evaluation extracts (and caches) one
kind of image feature for all three objectives.

Token bookkeeping shared by the training losses and the zero-shot scorers lives here too: a
caption's content tokens are the positions strictly between start-of-text (position 0) and its
end-of-text token (the highest id in the row: ``argmax``). Positions, not ids, decide, because
padding is id 0, which is also the BPE symbol ``!``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OBJECTIVES, CLIPConfig
from .clip import CLIP

# The checkpoint keys an objective adds to CLIP's state dict (bow, caption: ``head.weight``, ``head.bias``).
HEAD_PREFIX = "head."

# --- token bookkeeping ---------------------------------------------------------------------------

def end_positions(ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` position of each row's end-of-text token (the highest id of the vocabulary)."""
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [batch, length], got shape {tuple(ids.shape)}")
    return ids.argmax(dim=-1)


def content_mask(ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` True at a caption's content tokens: after start-of-text, before end-of-text."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    return (pos >= 1) & (pos < end_positions(ids)[:, None])


def bag_of_words(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` float32: each caption's content tokens as a probability distribution over the
    vocabulary (token counts / number of content tokens; a row without content is all zeros)."""
    mask = content_mask(ids)
    n = mask.sum(dim=1)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[mask]
    bag = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
    return bag.index_put_((rows, ids[mask]), 1.0 / n[rows].float(), accumulate=True)


def caption_targets(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher forcing for ``[B, L]`` ids (start-of-text, tokens, end-of-text, padding):
    ``(inputs, targets, mask)``, each ``[B, T]`` with ``T`` = the batch's longest caption
    (end-of-text included) minus one. ``inputs[:, t]`` is read at position ``t`` (position 0: the
    start-of-text slot, which :meth:`CaptioningCLIP.decode` fills with the image), ``targets[:, t]
    = ids[:, t + 1]`` is what position ``t`` predicts, ``mask`` marks the real targets: every
    content token and the end-of-text token, never padding."""
    end = end_positions(ids)
    length = max(int(end.max()) + 1 if ids.shape[0] else 0, 2)
    inputs, targets = ids[:, : length - 1], ids[:, 1:length]
    mask = torch.arange(targets.shape[1], device=ids.device) < end[:, None]
    return inputs, targets, mask


# --- the models --------------------------------------------------------------------------------

class HeadCLIP(CLIP):
    """A CLIP with one more module, ``head``: a linear map from the unit-norm image embedding to
    ``out_features`` (initialised so its outputs start small: std ``embed_dim ** -0.5``)."""

    objective = "contrastive"

    def __init__(self, config: CLIPConfig, out_features: int) -> None:
        super().__init__(config)
        self.head = nn.Linear(config.embed_dim, out_features)
        nn.init.normal_(self.head.weight, std=config.embed_dim ** -0.5)
        nn.init.zeros_(self.head.bias)

    def unused_parameter_names(self) -> list[str]:
        """Parameters this objective never reads (training freezes them)."""
        return ["logit_scale"]

    def num_parameters(self) -> dict[str, int]:
        n = super().num_parameters()
        head = sum(p.numel() for p in self.head.parameters())
        return {**n, "head": head, "total": n["total"] + head}


class BagOfWordsCLIP(HeadCLIP):
    """CLIP's image tower with a linear head to the BPE vocabulary (``objective="bow"``); the
    logits start nearly uniform."""

    objective = "bow"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config, config.text.vocab_size)

    def bow_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Unit-norm image features ``[B, E]`` -> vocabulary logits ``[B, V]``."""
        return self.head(image_features.to(self.head.weight.dtype))

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Images -> vocabulary logits ``[B, V]`` (``ids`` is ignored: the head sees the image only)."""
        return self.bow_logits(self.encode_image(images, normalize=True))

    def unused_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("text.") or n == "logit_scale"]


class CaptioningCLIP(HeadCLIP):
    """CLIP's image tower and its causal text Transformer as a caption decoder conditioned on the
    image (``objective="caption"``); ``head`` projects the image embedding to the first token."""

    objective = "caption"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config, config.text.width)

    def decode(self, image_features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decoder states ``[B, L, W]`` (after the final LayerNorm) for unit-norm image features
        ``[B, E]`` and ids ``[B, L]``: position 0 holds the image (``ids[:, 0]``, start-of-text, is
        not read), position ``t > 0`` the token ``ids[:, t]``; attention is causal, so state ``t``
        has seen the image and ``ids[:, 1..t]`` and predicts ``ids[:, t + 1]``."""
        text = self.text
        text._check(ids)
        dtype = text.text_projection.dtype
        image = self.head(image_features.to(self.head.weight.dtype)).to(dtype)[:, None]  # [B, 1, W]
        x = torch.cat([image, text.token_embedding(ids[:, 1:]).to(dtype)], dim=1)
        x = x + text.positional_embedding[: ids.shape[1]].to(dtype)
        return text.ln_final(text.transformer(x))

    def token_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Decoder states ``[..., W]`` -> vocabulary logits ``[..., V]`` (output embeddings tied to
        the token embeddings)."""
        return F.linear(states, self.text.token_embedding.weight.to(states.dtype))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Teacher-forced logits ``[B, L, V]``: position ``t`` scores the token ``ids[:, t + 1]``."""
        return self.token_logits(self.decode(self.encode_image(images, normalize=True), ids))

    @torch.no_grad()
    def prompt_log_likelihood(self, image_features: torch.Tensor, ids: torch.Tensor,
                              rows_per_chunk: int | None = None) -> torch.Tensor:
        """``[N, P]``: for every image (unit-norm features ``[N, E]``) and prompt (ids ``[P, L]``),
        the mean over the prompt's tokens (content and end-of-text) of ``log p(token | image,
        tokens before it)``: the mean, not the sum, so classes whose names take more BPE pieces do
        not lose for their length. The reference computation: one teacher-forced pass per
        (image, prompt) pair, ``rows_per_chunk`` pairs at a time (default: all). Zero-shot
        evaluation uses ``clipforge.eval``'s prefix-sharing, memory-bounded equivalent."""
        inputs, targets, mask = caption_targets(ids)
        n, p = image_features.shape[0], ids.shape[0]
        img, prm = torch.arange(n * p) // p, torch.arange(n * p) % p
        out = torch.zeros(n * p, dtype=torch.float32)
        rows = rows_per_chunk or max(n * p, 1)
        for s in range(0, n * p, rows):
            i, q = img[s:s + rows], prm[s:s + rows]
            states = self.decode(image_features[i].to(self.device), inputs[q].to(self.device))  # [r, T, W]
            logp = self.token_logits(states).float().log_softmax(dim=-1).cpu()  # [r, T, V]
            token = logp.gather(-1, targets[q][..., None])[..., 0]  # [r, T]
            out[s:s + rows] = (token * mask[q]).sum(dim=1) / mask[q].sum(dim=1).clamp(min=1)
        return out.view(n, p)

    def unused_parameter_names(self) -> list[str]:
        return ["text.text_projection", "logit_scale"]


MODEL_CLASSES: dict[str, type[CLIP]] = {"contrastive": CLIP, "bow": BagOfWordsCLIP, "caption": CaptioningCLIP}
assert tuple(MODEL_CLASSES) == OBJECTIVES


def model_class(config: CLIPConfig) -> type[CLIP]:
    """The model class of ``config.objective``."""
    return MODEL_CLASSES[config.objective]


def objective_of(model: nn.Module) -> str:
    """``contrastive`` | ``bow`` | ``caption`` (any model without a clipforge config: contrastive)."""
    return str(getattr(getattr(model, "config", None), "objective", "contrastive"))


def with_objective(model: CLIP, objective: str, *, seed: int | None = None) -> CLIP:
    """``model`` if it already has ``objective``; else a model of that objective with ``model``'s
    towers and temperature and a fresh head (seeded), e.g. to start a bow run from CLIP weights.
    A head of another objective is dropped."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective_of(model) == objective:
        return model
    config = dataclasses.replace(model.config, objective=objective)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        new = model_class(config)(config)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    missing, unexpected = new.load_state_dict(shared, strict=False)
    if unexpected or any(not k.startswith(HEAD_PREFIX) for k in missing):
        raise ValueError(f"cannot move the weights to objective {objective}: missing {missing}, unexpected {unexpected}")
    return new.to(device=model.device)


__all__ = ["HEAD_PREFIX", "HeadCLIP", "BagOfWordsCLIP", "CaptioningCLIP", "MODEL_CLASSES", "model_class", "objective_of", "with_objective",
           "content_mask", "bag_of_words", "caption_targets", "end_positions"]
