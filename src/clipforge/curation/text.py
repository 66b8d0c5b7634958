"""Caption text helpers shared by the steps: word tokens for query matching, the normalised
caption used for exact de-duplication, and a script-based language guess for statistics."""

from __future__ import annotations

import hashlib
from collections import Counter

import regex

_WORD = regex.compile(r"\w+", regex.UNICODE)
_NON_WORD = regex.compile(r"[\W_]+", regex.UNICODE)

#: Scripts counted by :func:`guess_language`, with the label reported for captions dominated by them.
_SCRIPTS: list[tuple[str, str]] = [
    ("Latin", "latin"), ("Cyrillic", "cyrillic"), ("Greek", "el"), ("Arabic", "arabic"), ("Hebrew", "he"),
    ("Devanagari", "devanagari"), ("Thai", "th"), ("Hangul", "ko"), ("Hiragana", "ja"), ("Katakana", "ja"),
    ("Han", "zh"), ("Bengali", "bn"), ("Tamil", "ta"), ("Georgian", "ka"), ("Armenian", "hy"),
]
_SCRIPT_RES = [(regex.compile(rf"\p{{Script={s}}}"), label) for s, label in _SCRIPTS]

# Frequent English function words (leaving out ones common in other Latin-script languages, such
# as "a", "in", "an", "on"): a Latin-script caption with one of them, or with an "-ing" word, is
# counted as English.
_EN_WORDS = frozenset(
    "the of at with and or is are was were be been has have had to for from by this that these those it its "
    "his her their there here while near into onto over under through across along around behind next top "
    "front out up down after before about one two three some very not all who which what where when how you "
    "we they he she my your our more than then but just like together outside inside against".split())
#: English stopwords (function words) that ``clipforge data queries --drop-stopwords`` leaves out.
STOPWORDS = _EN_WORDS | frozenset(
    "a an in on as is it i me he him she her they them we us you do does did doing so if no nor not only own same "
    "too can will just don should now any each few other such both because until again further once s t".split())
_ING = regex.compile(r"[a-z]{2,}ing\b")


def words(text: str) -> list[str]:
    """Case-folded word tokens (Unicode ``\\w+`` runs): punctuation and spacing never matter."""
    return _WORD.findall(text.casefold())


def normalize_caption(text: str) -> str:
    """Lower-cased caption with runs of whitespace, punctuation and underscores collapsed to one
    space, so "A dog, running!" and "a dog running" are exact duplicates."""
    return _NON_WORD.sub(" ", text.casefold()).strip()


def caption_hash(captions: list[str]) -> str:
    """Hash of the normalised captions (order kept: a sample's caption list is its text)."""
    return hashlib.sha1("\x1e".join(normalize_caption(c) for c in captions).encode("utf-8")).hexdigest()


def guess_language(text: str) -> str:
    """A cheap language label from the dominant Unicode script: ``en`` / ``latin`` (other
    Latin-script), ``zh``, ``ja`` (any kana), ``ko``, ``cyrillic``, ... or ``unknown``.

    Good enough for the share of non-English captions in a crawl; not a language identifier.
    """
    counts: Counter[str] = Counter()
    for rx, label in _SCRIPT_RES:
        n = len(rx.findall(text))
        if n:
            counts[label] += n
    if not counts:
        return "unknown"
    if counts.get("ja") and counts.get("zh"):  # Japanese mixes kanji (Han) with kana
        counts["ja"] += counts.pop("zh")
    label = counts.most_common(1)[0][0]
    if label == "latin":
        toks = words(text)
        return "en" if any(w in _EN_WORDS for w in toks) or any(_ING.fullmatch(w) for w in toks) else "latin"
    return label
