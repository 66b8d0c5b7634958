"""Counting of skipped samples: in a large crawled dataset some images are always corrupt or
missing, so a bad sample is skipped and counted by reason (never fatal), and the counts travel
with the batches from worker processes back to the training loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("clipforge.data")

#: Reasons used by the built-in sources (free-form strings are allowed too).
REASONS = {
    "missing_file": "image file does not exist",
    "decode_error": "image bytes cannot be decoded",
    "empty_caption": "no non-empty caption",
    "missing_image": "shard member / manifest row without an image",
    "missing_caption": "shard member without a caption (txt/json)",
    "bad_json": "caption JSON member cannot be parsed",
    "corrupt_shard": "tar shard unreadable or truncated (rest of the shard skipped)",
    "unreachable_shard": "shard URL / command / file cannot be opened (whole shard skipped)",
    "transform_error": "the image transform raised on this image",
}


class BadSample(ValueError):
    """One sample cannot be used; ``reason`` is a short key counted in :class:`SkipStats`."""

    def __init__(self, reason: str, key: str, detail: str = "") -> None:
        self.reason, self.key, self.detail = reason, key, detail
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class SkipStats:
    """Skipped samples counted by reason, with the first few offending keys as examples.

    ``log_first`` skips are logged at warning level (then silently counted) so a dataset with
    a million broken URLs does not flood the log.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    max_examples: int = 10
    log_first: int = 5

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, key: str, detail: str = "") -> None:
        """Count one skipped sample."""
        n = self.total
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"key": key, "reason": reason, "detail": detail})
        if self.log_first <= 0:
            return
        if n < self.log_first:
            logger.warning("skipping sample %s: %s%s", key, reason, f" ({detail})" if detail else "")
        elif n == self.log_first:
            logger.warning("more samples skipped; further skips are only counted (see loader stats)")

    def add_bad(self, err: BadSample) -> None:
        self.add(err.reason, err.key, err.detail)

    def merge(self, other: "SkipStats | dict[str, Any]") -> "SkipStats":
        """Add another object's counts (and examples, up to ``max_examples``) into this one."""
        if isinstance(other, dict):
            other = SkipStats.from_dict(other)
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        room = self.max_examples - len(self.examples)
        if room > 0:
            self.examples.extend(dict(e) for e in other.examples[:room])
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": [dict(e) for e in self.examples]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SkipStats":
        return cls(counts={str(k): int(v) for k, v in d.get("counts", {}).items()},
                   examples=[dict(e) for e in d.get("examples", [])])

    def __bool__(self) -> bool:  # an empty stats object is still a valid object
        return True

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"SkipStats(total={self.total}{', ' if inner else ''}{inner})"
