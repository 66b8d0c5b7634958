"""Image-text retrieval Recall@K with several captions per image (Flickr30k/COCO protocol).

An image query is correct at K if *any* of its captions is among the K most similar texts; a
text query is correct if its own image is among the K most similar images.

Every score of a query - its positives and every competitor - comes from one matrix product,
in CLIP_benchmark's orientation (``texts @ images.T``; image queries read its transpose). When
the whole matrix fits in ``block_elems`` it is one product, exactly as CLIP_benchmark computes
it; larger sets are scored in blocks of query rows against *all* candidates, so no query's
scores mix two products (the old code scored a query's own captions with an elementwise sum
and the rest with a matmul; they round differently, so an identical caption of another image
could outrank the query's own).

Tie rule (``ties``):
  ``"clip_benchmark"`` (default) - Recall@K is ``torch.topk(scores, K)`` per query, as
      ``clip_benchmark.metrics.zeroshot_retrieval.recall_at_k``: among *exactly equal* scores
      (duplicate captions or images) the order is torch.topk's, which is implementation-defined
      (not by index; measured). Numbers therefore equal CLIP_benchmark's on identical features.
  ``"query"`` - ties go to the query: a candidate outranks the query's best positive only with a
      strictly higher score (the optimistic bound; deterministic).
Median ranks always use the ``"query"`` rule (1 + candidates scoring strictly higher), and the
record counts the queries whose best positive is tied with a negative, i.e. where the rule matters.

Ranks are computed on cosine similarities: the model's logits ``exp(t) * cos (+ b)`` order every
query's candidates the same way (a positive scale and one constant bias), so Recall@K of a
sigmoid-loss (SigLIP) model needs no special case. What does depend on the bias is the score
itself: :func:`pair_logits` / :func:`pair_probabilities` give the model's logits and, for a model
with a ``logit_bias``, the sigmoid match probability of each pair (its training objective),
otherwise the softmax over the texts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..inference import embed_images
from ..preprocess import image_transform, load_image
from ..tokenizer import DEFAULT_OVERLAP
from .features import skippable_errors
from .zeroshot import embed_texts_length_sorted

DEFAULT_KS = (1, 5, 10)
TIE_RULES = ("clip_benchmark", "query")


def _blocks(n: int, size: int) -> Iterable[tuple[int, int]]:
    """``[s, e)`` ranges of ``size`` rows; a 1-row tail is merged into the previous block (a
    1-row product may run a matrix-vector kernel that rounds differently)."""
    size = max(2, size)
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for k, s in enumerate(starts):
        yield s, (starts[k + 1] if k + 1 < len(starts) else n)


def _as_float(x: Any) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).float()


def _check(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor) -> None:
    ni, nt = img.shape[0], txt.shape[0]
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"image features {tuple(img.shape)} and text features {tuple(txt.shape)} must be [N, D] with equal D")
    if owner.shape[0] != nt:
        raise ValueError(f"text_to_image has {owner.shape[0]} entries for {nt} texts")
    if nt and (owner.min() < 0 or owner.max() >= ni):
        raise ValueError(f"text_to_image values must lie in [0, {ni}); got range [{int(owner.min())}, {int(owner.max())}]")


def _score_rows(img: torch.Tensor, txt: torch.Tensor, queries: str, block_elems: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(q0, q1, S)``: scores of queries ``q0:q1`` (``"text"`` or ``"image"``) against every
    candidate, each row from a single product."""
    ni, nt = img.shape[0], txt.shape[0]
    if ni * nt <= block_elems:
        full = txt @ img.t()                                   # [Nt, Ni], CLIP_benchmark's product
        yield (0, nt, full) if queries == "text" else (0, ni, full.t())
        return
    if queries == "text":
        for j0, j1 in _blocks(nt, block_elems // max(1, ni)):
            yield j0, j1, txt[j0:j1] @ img.t()
    else:
        for i0, i1 in _blocks(ni, block_elems // max(1, nt)):
            yield i0, i1, img[i0:i1] @ txt.t()


@dataclass
class RetrievalRanks:
    """Per-query outcomes. ``*_rank``: 0-based rank of the best positive under the ``"query"``
    tie rule (-1 for an image without captions); ``*_topk_hit[k]``: hit at K by ``torch.topk``
    (CLIP_benchmark's rule); ``*_tied``: the best positive ties with at least one negative."""

    i2t_rank: np.ndarray
    t2i_rank: np.ndarray
    i2t_topk_hit: dict[int, np.ndarray]
    t2i_topk_hit: dict[int, np.ndarray]
    i2t_tied: np.ndarray
    t2i_tied: np.ndarray


@torch.inference_mode()
def rank_queries(image_features: Any, text_features: Any, text_to_image: Any, *, ks: Sequence[int] = DEFAULT_KS,
                 block_elems: int = 1 << 24, progress: bool = False) -> RetrievalRanks:
    """Both directions of retrieval for unit-norm features (similarity = dot product)."""
    img, txt = _as_float(image_features), _as_float(text_features)
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long).reshape(-1)
    _check(img, txt, owner)
    ni, nt = img.shape[0], txt.shape[0]
    ks = sorted({int(k) for k in ks})
    if any(k < 1 for k in ks):
        raise ValueError(f"recall K values must be >= 1, got {ks}")
    out: dict[str, Any] = {}
    bar = tqdm(total=ni + nt, desc="retrieval ranks", unit="query", disable=not progress)
    for queries, nq, nc in (("image", ni, nt), ("text", nt, ni)):
        rank = torch.full((nq,), -1, dtype=torch.long)
        tied = torch.zeros(nq, dtype=torch.bool)
        hits = {k: torch.zeros(nq, dtype=torch.bool) for k in ks}
        for q0, q1, S in (_score_rows(img, txt, queries, block_elems) if nq and nc else ()):
            if queries == "text":                                # a caption's one positive: its image
                pos = torch.zeros(S.shape, dtype=torch.bool)
                pos[torch.arange(q1 - q0), owner[q0:q1]] = True
            else:                                                # an image's positives: its captions
                pos = owner[None, :] == torch.arange(q0, q1)[:, None]
            best = S.masked_fill(~pos, -torch.inf).amax(dim=1, keepdim=True)
            has = pos.any(dim=1)
            neg = ~pos
            r = ((S > best) & neg).sum(dim=1)
            rank[q0:q1] = torch.where(has, r, torch.full_like(r, -1))
            tied[q0:q1] = ((S == best) & neg).any(dim=1) & has
            for k in ks:
                top = S.topk(min(k, nc), dim=1).indices
                hits[k][q0:q1] = pos.gather(1, top).any(dim=1) & has
            bar.update(q1 - q0)
        out[queries] = (rank.numpy(), {k: h.numpy() for k, h in hits.items()}, tied.numpy())
    bar.close()
    (i_rank, i_hit, i_tied), (t_rank, t_hit, t_tied) = out["image"], out["text"]
    return RetrievalRanks(i_rank, t_rank, i_hit, t_hit, i_tied, t_tied)


def retrieval_ranks(image_features: Any, text_features: Any, text_to_image: Any, *,
                    block_elems: int = 1 << 24, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks under the ``"query"`` tie rule: ``i2t[Ni]`` of each image's best caption
    (-1 for images without captions) and ``t2i[Nt]`` of each caption's image."""
    r = rank_queries(image_features, text_features, text_to_image, ks=(1,), block_elems=block_elems,
                     progress=progress)
    return r.i2t_rank, r.t2i_rank


def pair_logits(model: Any, image_features: Any, text_features: Any) -> torch.Tensor:
    """``[Ni, Nt]`` logits of the model for unit-norm features: ``exp(logit_scale) * cos``, plus
    ``logit_bias`` for a sigmoid-loss model (as its ``forward`` computes them)."""
    img, txt = _as_float(image_features), _as_float(text_features)
    logits = float(model.logit_scale.detach().float().exp()) * img @ txt.t()
    bias = getattr(model, "logit_bias", None)
    return logits if bias is None else logits + float(bias.detach())


def pair_probabilities(model: Any, image_features: Any, text_features: Any) -> torch.Tensor:
    """``[Ni, Nt]``: each pair's match probability, ``sigmoid(logit)`` for a sigmoid-loss model
    (independent per pair, as trained), else each image's softmax over the texts."""
    logits = pair_logits(model, image_features, text_features)
    return logits.sigmoid() if getattr(model, "logit_bias", None) is not None else logits.softmax(dim=-1)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    valid = ranks[ranks >= 0]
    return {k: float((valid < k).mean()) if valid.size else float("nan") for k in ks}


def _recall_from_hits(hits: dict[int, np.ndarray], ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    valid = ranks >= 0
    return {k: float(hits[k][valid].mean()) if valid.any() else float("nan") for k in ks}


def retrieval_metrics(image_features: Any, text_features: Any, text_to_image: Any, *,
                      ks: Sequence[int] = DEFAULT_KS, ties: str = "clip_benchmark", block_elems: int = 1 << 24,
                      progress: bool = False) -> dict[str, float]:
    """CLIP_benchmark keys: ``image_retrieval_recall@K`` (text -> image) and
    ``text_retrieval_recall@K`` (image -> text), plus ``mean_recall``, median ranks (1-based)
    and the number of queries whose best positive ties with a negative. ``ties``: see module doc."""
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; expected one of {TIE_RULES}")
    r = rank_queries(image_features, text_features, text_to_image, ks=ks, block_elems=block_elems, progress=progress)
    if ties == "query":
        r_t2i, r_i2t = recall_from_ranks(r.t2i_rank, ks), recall_from_ranks(r.i2t_rank, ks)
    else:
        r_t2i, r_i2t = _recall_from_hits(r.t2i_topk_hit, r.t2i_rank, ks), _recall_from_hits(r.i2t_topk_hit, r.i2t_rank, ks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = r_t2i[k]
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = r_i2t[k]
    out["mean_recall"] = float(np.mean(list(r_t2i.values()) + list(r_i2t.values())))
    t2i = r.t2i_rank
    out["image_retrieval_median_rank"] = float(np.median(t2i + 1)) if t2i.size else float("nan")
    valid = r.i2t_rank[r.i2t_rank >= 0]
    out["text_retrieval_median_rank"] = float(np.median(valid + 1)) if valid.size else float("nan")
    out["image_retrieval_tied_queries"] = int(r.t2i_tied.sum())
    out["text_retrieval_tied_queries"] = int(r.i2t_tied.sum())
    return out


def recall_from_similarity(similarity: Any, text_to_image: Any, ks: Sequence[int] = DEFAULT_KS,
                           **kw: Any) -> dict[str, float]:
    """Metrics for an explicit ``[Ni, Nt]`` similarity matrix (image rows, text columns)."""
    s = torch.as_tensor(np.asarray(similarity), dtype=torch.float32)
    return retrieval_metrics(s, torch.eye(s.shape[1]), text_to_image, ks=ks, **kw)


@dataclass
class PairFeatures:
    image_features: torch.Tensor
    text_features: torch.Tensor
    text_to_image: np.ndarray
    keys: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_keys: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _unpack(sample: Any, index: int) -> tuple[str, Any, list[str]]:
    if hasattr(sample, "image") and hasattr(sample, "captions"):
        key, image, caps = getattr(sample, "key", str(index)), sample.image, sample.captions
    elif isinstance(sample, (tuple, list)) and len(sample) == 2:
        (image, caps), key = sample, str(index)
    else:
        raise ValueError(f"retrieval sample {index}: expected (image, captions) or an object with .image/.captions, "
                         f"got {type(sample).__name__}")
    if isinstance(caps, str):
        caps = [caps]
    return str(key), image, [str(c) for c in caps]


def embed_pairs(model: Any, samples: Iterable[Any], *, preprocess: Any = None, batch_size: int = 64,
                text_batch_size: int = 256, progress: bool = False, total: int | None = None,
                long_text: str | None = None, long_text_overlap: int = DEFAULT_OVERLAP) -> PairFeatures:
    """Stream ``(image, captions)`` samples: images are embedded batch by batch as they arrive;
    an unreadable image (``ImageLoadError``) is skipped with its captions and counted."""
    pre = preprocess or image_transform(model.config.preprocess)
    captions: list[str] = []
    owner: list[int] = []
    keys: list[str] = []
    skipped: list[str] = []
    feats: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="embed images", unit="img", disable=not progress)

    def flush() -> None:
        if pending:
            feats.append(embed_images(model, pending, batch_size=batch_size))
            pending.clear()

    bad = skippable_errors()
    for idx, sample in enumerate(samples):
        key, image, caps = _unpack(sample, idx)
        try:
            if not hasattr(image, "convert"):
                image = load_image(image, name=key)
            x = image if isinstance(image, torch.Tensor) else pre(image)
        except bad as e:
            skipped.append(f"{key}: {e}")
            bar.update(1)
            continue
        if not caps:
            skipped.append(f"{key}: no captions")
            bar.update(1)
            continue
        n = len(keys)
        keys.append(key)
        captions.extend(caps)
        owner.extend([n] * len(caps))
        pending.append(x)
        if len(pending) >= batch_size:
            flush()
        bar.update(1)
    flush()
    bar.close()
    t1 = time.perf_counter()
    text = embed_texts_length_sorted(model, captions, batch_size=text_batch_size, progress=progress,
                                     long_text=long_text, overlap=long_text_overlap)
    t2 = time.perf_counter()
    img = torch.cat(feats) if feats else torch.empty(0, text.shape[1])
    return PairFeatures(F.normalize(img, dim=-1), text, np.asarray(owner, dtype=np.int64), keys,
                        len(skipped), skipped, {"image_embed": t1 - t0, "text_embed": t2 - t1})
