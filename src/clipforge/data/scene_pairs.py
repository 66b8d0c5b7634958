"""Minimal pairs of built-in scenes for ``image_caption_selection`` (Winoground-style groups): two
scenes and two captions, each caption true of its own scene only, differing by one of
:data:`SELECTION_TYPES` (SugarCREPE's negative types the scenes can show, and two more).
Objects come from seen combos only, so a miss is a binding failure, not an unseen combo."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

from .base import stable_rng
from .scenes import (COUNT_WORDS, TRAIN_COMBOS, SceneSpec, count_objects, finish_scene, plural, relation_caption,
                     relation_objects, single_objects, swap_positions)

#: SugarCREPE's negative types that the scenes can show (its swap_att / swap_obj / replace_rel) and
#: two more, the arrangement flipped (replace_pos) and the count changed (change_count).
SELECTION_TYPES: tuple[str, ...] = ("swap_att", "swap_obj", "replace_rel", "replace_pos", "change_count")


@dataclass(frozen=True)
class SelectionGroup:
    """A Winoground-style minimal pair: ``captions[i]`` is true of ``specs[i]`` and false of the
    other scene; the two captions differ only as ``type`` says (same words for the swaps)."""

    type: str
    specs: tuple[SceneSpec, SceneSpec]
    captions: tuple[str, str]


def _distinct_pair(rng: random.Random, swapped_must_exist: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two seen combos of different colour and different shape (with ``swapped_must_exist`` their
    colour- and shape-swapped combos are seen too, so neither scene of a pair is a held-out combo)."""
    while True:
        (ca, sa), (cb, sb) = rng.sample(TRAIN_COMBOS, 2)
        if ca == cb or sa == sb:
            continue
        if swapped_must_exist and not {(cb, sa), (ca, sb)} <= set(TRAIN_COMBOS):
            continue
        return (ca, sa), (cb, sb)


def _selection_group(kind: str, rng: random.Random) -> SelectionGroup:
    if kind == "change_count":
        combo = rng.choice(TRAIN_COMBOS)
        n1, n2 = rng.sample((1, 2, 3), 2)
        specs = []
        for n in (n1, n2):
            objs = single_objects(rng, combo) if n == 1 else count_objects(rng, combo, n)
            specs.append(finish_scene(rng, "single" if n == 1 else "count", objs))
        specs[1] = dataclasses.replace(specs[1], background=specs[0].background, texture=specs[0].texture)
        c, s = combo
        caps = tuple(f"one {c} {s}" if n == 1 else f"{COUNT_WORDS[n - 1]} {c} {plural(s)}" for n in (n1, n2))
        return SelectionGroup(kind, (specs[0], specs[1]), caps)  # type: ignore[arg-type]
    a, b = _distinct_pair(rng, swapped_must_exist=kind in ("swap_att", "swap_obj"))
    rel = rng.choice(("left", "above"))
    first = finish_scene(rng, "relation", relation_objects(rng, a, b, rel), rel)
    j = rng.randrange(2)  # which object the captions name first (both phrasings occur)
    o0, o1 = first.objects
    if kind in ("swap_att", "swap_obj"):
        key = "colour" if kind == "swap_att" else "shape"
        other = dataclasses.replace(first, objects=(dataclasses.replace(o0, **{key: getattr(o1, key)}),
                                                    dataclasses.replace(o1, **{key: getattr(o0, key)})))
        named = [(s.objects[j].colour, s.objects[j].shape) for s in (first, other)]
        return SelectionGroup(kind, (first, other), (relation_caption(first, named[0]), relation_caption(other, named[1])))
    name = (a, b)[j]
    if kind == "replace_rel":  # the other axis: "to the left of" -> "above" / "below"
        rel2 = "above" if rel == "left" else "left"
        pair = (a, b) if rng.random() < 0.5 else (b, a)
        other = dataclasses.replace(first, objects=relation_objects(rng, *pair, rel2), relation=rel2)
        return SelectionGroup(kind, (first, other), (relation_caption(first, name), relation_caption(other, name)))
    if kind == "replace_pos":  # the same axis, flipped: the re-arranged scene
        other = swap_positions(first)
        assert other is not None
        return SelectionGroup(kind, (first, other), (relation_caption(first, name), relation_caption(other, name)))
    raise ValueError(f"unknown selection type {kind!r}; known: {', '.join(SELECTION_TYPES)}")


def selection_groups(n_per_type: int = 50, seed: int = 0,
                     types: Sequence[str] = SELECTION_TYPES) -> list[SelectionGroup]:
    """``n_per_type`` minimal pairs of each type, objects from seen combos only (so a miss is a
    binding failure, not an unseen combo). Drawn from their own seeded stream, not from any
    split's, so no training scene is among them (positions and render seeds are continuous draws)."""
    if n_per_type < 1:
        raise ValueError(f"n_per_type must be >= 1, got {n_per_type}")
    unknown = [t for t in types if t not in SELECTION_TYPES]
    if unknown:
        raise ValueError(f"unknown selection type(s) {unknown}; known: {', '.join(SELECTION_TYPES)}")
    return [_selection_group(t, stable_rng("scenes-selection", seed, t, k)) for t in types for k in range(n_per_type)]


__all__ = ["SELECTION_TYPES", "SelectionGroup", "selection_groups"]
