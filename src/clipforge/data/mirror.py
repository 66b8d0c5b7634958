"""Image-side hard negatives (``--hard-negatives mirror``): each sample's mirrored companion,
an image whose arrangement is changed, with its truthfully changed caption, added to the same
batch as one more pair. Text-only negatives are satisfied by pulling the swapped captions
together; the companion makes both sides of the loss see the pair, so the image tower must tell
the two arrangements apart.

* built-in scenes: the re-arranged scene (:func:`~clipforge.data.scenes.swap_positions`: the two
  objects of a relation scene trade places, a true mirror on the scene's axis) rendered from its
  spec, its caption the chosen caption with every spatial word swapped; kept only when that
  caption is one the scene generator itself gives the new scene (its ground truth). Other kinds,
  and captions with no spatial word, get no companion.
* photos (any other source): the horizontal flip, its caption with left/right words swapped
  ("left" <-> "right", "leftmost" <-> "rightmost"; above/below do not change under a horizontal
  flip). A caption with no such word has no companion; ``other="flip"`` then flips the sample's
  own image (plain augmentation, seeded), ``"skip"`` leaves it as it is.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image

from .base import Sample
from .scenes import ScenesDataset, render_scene, scene_captions, swap_positions

OTHER_MODES: tuple[str, ...] = ("skip", "flip")

_HORIZONTAL = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_SCENE = {**_HORIZONTAL, "above": "below", "below": "above", "top": "bottom", "bottom": "top"}


def _swapper(table: dict[str, str]):
    pattern = re.compile(r"\b(" + "|".join(sorted(table, key=len, reverse=True)) + r")\b", re.IGNORECASE)

    def swap(caption: str) -> str:
        def one(m: re.Match[str]) -> str:
            w, new = m.group(), table[m.group().lower()]
            if len(w) > 1 and w.isupper():
                return new.upper()
            return new[:1].upper() + new[1:] if w[:1].isupper() else new
        return pattern.sub(one, caption)
    return swap


#: "the cup on the left" -> "the cup on the right" (a horizontal flip's caption).
swap_left_right = _swapper(_HORIZONTAL)
#: Every spatial word of the scenes' captions swapped (the re-arranged scene's caption).
swap_scene_spatial = _swapper(_SCENE)


class Companion(NamedTuple):
    image: Image.Image
    caption: str


class MirroredText(NamedTuple):
    """The text side of a batch with companions: ``text`` for ``2B`` rows (the ``B`` samples, then
    their companions in the same order) and ``present [2B]`` (bool: which rows are real; an
    absent companion's row is a zero image and an empty caption, excluded from the loss)."""

    text: Any
    present: torch.Tensor


@dataclass(frozen=True)
class MirrorCompanions:
    """``(source, sample, caption, rng) -> Companion | "flip" | None``. Picklable, for workers."""

    other: str = "skip"

    def __post_init__(self) -> None:
        if self.other not in OTHER_MODES:
            raise ValueError(f"mirror negatives: other must be one of {', '.join(OTHER_MODES)}, got {self.other!r}")

    def __call__(self, source: Any, sample: Sample, caption: str, rng: random.Random) -> Companion | str | None:
        if isinstance(source, ScenesDataset):
            return scene_companion(source, sample, caption)
        new = swap_left_right(caption)
        if new != caption:
            return Companion(sample.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), new)
        if self.other == "flip" and rng.random() < 0.5:
            return "flip"
        return None


def scene_companion(source: ScenesDataset, sample: Sample, caption: str) -> Companion | None:
    """The re-arranged scene of a built-in sample with the caption it makes true, or None."""
    spec = source.scene(int(sample.meta["index"]))
    other = swap_positions(spec)
    if other is None:
        return None
    new = swap_scene_spatial(caption)
    if new == caption or new not in scene_captions(other) or new in scene_captions(spec):
        return None
    return Companion(render_scene(other, source.image_size), new)


__all__ = ["MirrorCompanions", "MirroredText", "Companion", "scene_companion", "swap_left_right",
           "swap_scene_spatial", "OTHER_MODES"]
