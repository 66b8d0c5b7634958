"""Rule-built hard negative captions (NegCLIP, Yuksekgonul et al. 2023) and the tokenizer that
adds them to a training batch.

A contrastive batch rarely holds the same objects in another arrangement, so the loss never pays
for word order and CLIP learns captions as bags of words. Each rule rewrites one kind of word of a
true caption into a caption that is false for its image, mostly with the same bag of words:

* ``spatial``: every spatial word swapped with its partner (left/right, above/below, top/bottom,
  over/under, upper/lower, inside/outside, in front of/behind, ...);
* ``colour``: two different colour words swapped ("a red circle left of a blue square" ->
  "a blue circle left of a red square"), or with one colour, one mention replaced by another colour;
* ``object``: the same with object/shape nouns (keeping each slot's singular/plural form);
* ``count``: a count (number word or a 1-2 digit number) replaced by a nearby other count, the
  noun that follows re-inflected ("one red circle" -> "two red circles").

Matching is case-insensitive at word boundaries ("redhead" has no colour) and the replacement
takes the replaced word's case. A rule yields a negative only when it changes the caption. With
more candidates than ``per_caption``, a subset is drawn by an RNG seeded from (seed, caption), so
the negatives of a caption are the same in every worker, process and epoch. Articles are left
as they are ("a red" -> "a orange"): the built-in scenes always say "a", and a changed article
would be a cue that marks negatives without reading the rest. Rules are word rules: "he left"
becomes "he right"; such noise is a weaker negative, not a wrong positive.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..data.base import stable_rng
from ..data.scenes import COLOURS, SHAPES, plural

RULES: tuple[str, ...] = ("spatial", "colour", "object", "count")
#: ``--hard-negatives``: text-side ``swap`` (here), image-side ``mirror``
#: (:mod:`clipforge.data.mirror`: the re-arranged scene or flipped photo as one more pair), or both.
MODES: tuple[str, ...] = ("none", "swap", "mirror", "swap,mirror")


def hard_negative_modes(value: str) -> frozenset[str]:
    """``"swap,mirror"`` -> {"swap", "mirror"}; ``"none"`` -> {}."""
    return frozenset(v for v in value.split(",") if v and v != "none")

# --- vocabularies ---------------------------------------------------------------------------------
SPATIAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("left", "right"), ("leftmost", "rightmost"), ("above", "below"), ("top", "bottom"), ("over", "under"),
    ("upper", "lower"), ("inside", "outside"), ("in front of", "behind"), ("north", "south"), ("east", "west"),
)
#: Colours drawn as replacements: the scenes' palette plus the two background colours that also
#: appear in their captions, so a replaced colour is never a word only negatives contain.
COLOUR_PALETTE: tuple[str, ...] = tuple(COLOURS) + ("white", "grey")
#: Colour words recognised (-> their canonical colour; "gray" is "grey", never a replacement for it).
COLOUR_WORDS: dict[str, str] = {**{c: c for c in COLOUR_PALETTE}, "gray": "grey", "brown": "brown",
                                "pink": "pink", "beige": "beige", "gold": "gold", "silver": "silver"}

#: Noun groups: a single object is replaced by another of its group (a circle by a square, a dog
#: by a cat). Plurals: :data:`_IRREGULAR`, else :func:`clipforge.data.scenes.plural` (the scenes' own).
_NOUN_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "animal": ("dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear"),
    "person": ("man", "woman", "boy", "girl", "child", "person"),
    "vehicle": ("car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "airplane"),
    "thing": ("ball", "cup", "bottle", "chair", "table", "book", "box", "bowl", "plate", "vase"),
}
_IRREGULAR: dict[str, str] = {"man": "men", "woman": "women", "child": "children", "person": "people",
                              "sheep": "sheep"}
#: Nouns a count re-inflects but the object rule never swaps ("a picture of two objects").
_COUNT_ONLY_NOUNS: tuple[str, ...] = ("object", "thing", "item", "shape")

NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_COUNT_WINDOW = 3  # words after a count searched for its noun ("two small red circles")


def _plural(noun: str) -> str:
    return _IRREGULAR.get(noun) or plural(noun)


NOUN_GROUP: dict[str, str] = {n: g for g, nouns in _NOUN_GROUPS.items() for n in nouns}
#: surface form -> (lemma, is_plural), for every noun a rule may touch.
_NOUN_FORMS: dict[str, tuple[str, bool]] = {}
for _n in list(NOUN_GROUP) + list(_COUNT_ONLY_NOUNS):
    _NOUN_FORMS.setdefault(_n, (_n, False))
    _NOUN_FORMS.setdefault(_plural(_n), (_n, _plural(_n) != _n))


def _words_pattern(words: list[str]) -> re.Pattern[str]:
    """Any of ``words`` (phrases allowed) as a whole word, case-insensitive, longest first."""
    alts = sorted(words, key=len, reverse=True)
    body = "|".join(r"\s+".join(map(re.escape, w.split())) for w in alts)
    return re.compile(rf"\b(?:{body})\b", re.IGNORECASE)


_SPATIAL_PARTNER = {a: b for a, b in SPATIAL_PAIRS} | {b: a for a, b in SPATIAL_PAIRS}
_SPATIAL_RE = _words_pattern(list(_SPATIAL_PARTNER))
_COLOUR_RE = _words_pattern(list(COLOUR_WORDS))
_NOUN_RE = _words_pattern(list(_NOUN_FORMS))
_NUMBER_RE = re.compile(r"\b(?:" + "|".join(NUMBER_WORDS) + r")\b|(?<![\d.,:/])\b\d{1,2}\b(?![.,:/]?\d)",
                        re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z]+")


def match_case(template: str, word: str) -> str:
    """``word`` in the case of ``template``: ``LEFT`` -> ``RIGHT``, ``Left`` -> ``Right``."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    """``text`` with each ``(start, end, replacement)`` span replaced (spans do not overlap)."""
    out, pos = [], 0
    for start, end, new in sorted(edits):
        out += [text[pos:start], new]
        pos = end
    return "".join(out) + text[pos:]


# --- the rules ------------------------------------------------------------------------------------
def swap_spatial(caption: str, rng: random.Random | None = None) -> str:
    """Every spatial word replaced by its partner (all at once: "from left to right" reverses)."""
    return _SPATIAL_RE.sub(lambda m: match_case(m.group(), _SPATIAL_PARTNER[_norm(m.group())]), caption)


class _Span(NamedTuple):
    start: int
    end: int
    surface: str  # as written
    key: str      # what "different" means: the canonical colour, the noun's lemma
    word: str     # what the span contributes when it moves to another slot


#: Words that may separate two items of a list ("a red circle, a blue circle and ...").
_LIST_GLUE = frozenset({"and", "or", "a", "an", "the", "with", "plus"})


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(text)]


def _list_permutation(caption: str, a: _Span, b: _Span, side: str) -> bool:
    """Would swapping ``a`` and ``b`` only reorder two list items with the same other word
    ("a yellow star, a yellow circle" -> "a yellow circle, a yellow star": a true caption)? Their
    neighbours on ``side`` ("before" for nouns, "after" for colours) are the same word and only
    list glue and that word lies between them. A relation between them ("above") makes it a real
    negative."""
    a, b = sorted((a, b))
    if side == "before":
        na, nb = _words(caption[:a.start])[-1:], _words(caption[:b.start])[-1:]
    else:
        na, nb = _words(caption[a.end:])[:1], _words(caption[b.end:])[:1]
    if na != nb:
        return False
    return all(w in _LIST_GLUE or [w] == na for w in _words(caption[a.end:b.start]))


def _swap_or_replace(caption: str, spans: list[_Span], rng: random.Random, side: str,
                     replacements: Callable[[str], list[str]], render: Callable[[str, str], str]) -> str:
    """Shared by the colour and object rules. Two spans of different keys trade words (a pair
    drawn from those whose swap is not a mere list reordering); failing that, one span becomes
    another of ``replacements(key)``. ``render(surface, word)`` inflects ``word`` for a slot."""
    if not spans:
        return caption
    pairs = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
             if a.key != b.key and not _list_permutation(caption, a, b, side)]
    if pairs:
        a, b = rng.choice(pairs)
        return _apply(caption, [(a.start, a.end, render(a.surface, b.word)), (b.start, b.end, render(b.surface, a.word))])
    span = rng.choice(spans)
    options = [c for c in replacements(span.key) if c != span.key]
    if not options:
        return caption
    return _apply(caption, [(span.start, span.end, render(span.surface, rng.choice(options)))])


def swap_colours(caption: str, rng: random.Random) -> str:
    """Two different colours trade places, or a colour becomes another of :data:`COLOUR_PALETTE`."""
    spans = [_Span(m.start(), m.end(), m.group(), COLOUR_WORDS[_norm(m.group())], _norm(m.group()))
             for m in _COLOUR_RE.finditer(caption)]
    return _swap_or_replace(caption, spans, rng, "after", lambda key: list(COLOUR_PALETTE), match_case)


def _inflect(surface: str, new_lemma: str) -> str:
    """``new_lemma`` in the number (singular/plural) and case of the noun ``surface``."""
    _, is_plural = _NOUN_FORMS[_norm(surface)]
    return match_case(surface, _plural(new_lemma) if is_plural else new_lemma)


def swap_objects(caption: str, rng: random.Random) -> str:
    """Two different object nouns trade places (each slot keeps its number), or an object
    becomes another of its group (shapes, animals, people, vehicles, things)."""
    spans = []
    for m in _NOUN_RE.finditer(caption):
        lemma, _ = _NOUN_FORMS[_norm(m.group())]
        if lemma in NOUN_GROUP:
            spans.append(_Span(m.start(), m.end(), m.group(), lemma, lemma))
    return _swap_or_replace(caption, spans, rng, "before", lambda key: list(_NOUN_GROUPS[NOUN_GROUP[key]]), _inflect)


def _count_value(token: str) -> int:
    t = token.lower()
    return NUMBER_WORDS.index(t) + 1 if t in NUMBER_WORDS else int(t)


def change_count(caption: str, rng: random.Random) -> str:
    """One count ``n`` becomes another of ``max(1, n-2) .. max(3, n+1)``, written the same way (word or
    digits); the noun within the next few words takes the new number ("one circle" -> "two circles")."""
    found = list(_NUMBER_RE.finditer(caption))
    if not found:
        return caption
    m = rng.choice(found)
    n = _count_value(m.group())
    if n < 1:
        return caption
    # near counts are the hard ones; at least 1..3, the scenes' counts, so "three" is not mostly "four"/"five"
    options = [v for v in range(max(1, n - 2), max(3, n + 1) + 1) if v != n]
    if m.group().isdigit():
        new_n = rng.choice(options)
        edits = [(m.start(), m.end(), str(new_n))]
    else:
        options = [v for v in options if v <= len(NUMBER_WORDS)]
        new_n = rng.choice(options)
        edits = [(m.start(), m.end(), match_case(m.group(), NUMBER_WORDS[new_n - 1]))]
    tail = caption[m.end():]
    for w in list(_WORD_RE.finditer(tail))[:_COUNT_WINDOW]:
        form = _NOUN_FORMS.get(w.group().lower())
        if form is None:
            continue
        lemma, is_plural = form
        want_plural = new_n != 1
        if want_plural != is_plural and (n == 1 or new_n == 1):
            new = _plural(lemma) if want_plural else lemma
            edits.append((m.end() + w.start(), m.end() + w.end(), match_case(w.group(), new)))
        break
    return _apply(caption, edits)


_RULE_FUNCS: dict[str, Callable[..., str]] = {"spatial": swap_spatial, "colour": swap_colours,
                                              "object": swap_objects, "count": change_count}


@dataclass(frozen=True)
class SwapNegatives:
    """Rule-built negatives of a caption (module docstring): at most ``per_caption`` of them, the
    same for the same (caption, seed) everywhere. Picklable, for data-loader workers."""

    per_caption: int = 3
    seed: int = 0
    rules: tuple[str, ...] = RULES

    def __post_init__(self) -> None:
        if not isinstance(self.per_caption, int) or self.per_caption < 1:
            raise ValueError(f"hard negatives: per_caption must be an integer >= 1, got {self.per_caption!r}")
        unknown = [r for r in self.rules if r not in _RULE_FUNCS]
        if unknown:
            raise ValueError(f"hard negatives: unknown rule(s) {unknown}; known: {', '.join(RULES)}")

    def candidates(self, caption: str) -> list[str]:
        """Every rule's negative (rule order), those that changed the caption, without duplicates."""
        rng = stable_rng("hard-negatives", self.seed, caption)
        out: list[str] = []
        for rule in self.rules:
            neg = _RULE_FUNCS[rule](caption, rng)
            if neg != caption and neg not in out:
                out.append(neg)
        return out

    def __call__(self, caption: str) -> list[str]:
        found = self.candidates(caption)
        if len(found) <= self.per_caption:
            return found
        rng = stable_rng("hard-negatives-pick", self.seed, caption)
        return [found[i] for i in sorted(rng.sample(range(len(found)), self.per_caption))]


# --- the batch ------------------------------------------------------------------------------------
class CaptionTokens(NamedTuple):
    """The text side of a batch with hard negatives: ``ids [B, L]``; ``neg_ids [B, C, L]`` (row
    ``i`` holds caption ``i``'s negatives, ``C`` = the per-caption cap, so every batch and every
    rank has the same shape); ``neg_mask [B, C]`` (bool: which of those rows are real)."""

    ids: torch.Tensor
    neg_ids: torch.Tensor
    neg_mask: torch.Tensor


@dataclass(frozen=True)
class TokenizeWithNegatives:
    """Captions -> :class:`CaptionTokens`: ``tokenize`` (captions -> ids) applied to the captions
    and to their ``negatives``. Picklable, for data-loader workers."""

    tokenize: Callable[[list[str]], torch.Tensor]
    negatives: SwapNegatives

    def __call__(self, texts: list[str]) -> CaptionTokens:
        texts = list(texts)
        ids = self.tokenize(texts)
        cap = self.negatives.per_caption
        per = [self.negatives(t) for t in texts]
        mask = torch.zeros(len(texts), cap, dtype=torch.bool)
        neg_ids = torch.zeros(len(texts), cap, ids.shape[1], dtype=ids.dtype)
        flat = [n for negs in per for n in negs]
        if flat:
            tokens = self.tokenize(flat)
            k = 0
            for i, negs in enumerate(per):
                neg_ids[i, :len(negs)] = tokens[k:k + len(negs)]
                mask[i, :len(negs)] = True
                k += len(negs)
        return CaptionTokens(ids, neg_ids, mask)


__all__ = ["hard_negative_modes", "SwapNegatives", "TokenizeWithNegatives", "CaptionTokens", "swap_spatial", "swap_colours",
           "swap_objects", "change_count", "match_case", "RULES", "MODES", "SPATIAL_PAIRS", "COLOUR_PALETTE"]
