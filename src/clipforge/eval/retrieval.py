"""Image-text retrieval Recall@K with several captions per image (Flickr30k/COCO protocol).

An image query is correct at K if *any* of its captions is among the K most similar texts; a
text query is correct if its own image is among the K most similar images. Ranks are computed
block by block: for each query the score of its best positive is taken, then the negatives that
beat it are counted over ``[rows, cols]`` tiles of bounded size, so a 100k x 500k similarity
matrix never exists at once (peak extra memory ~ ``block_elems`` floats). Ties go to the query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..inference import embed_images
from ..preprocess import image_transform, load_image
from .zeroshot import embed_texts_length_sorted

DEFAULT_KS = (1, 5, 10)


def _blocks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(n, s + size)


@torch.inference_mode()
def retrieval_ranks(image_features: Any, text_features: Any, text_to_image: Any, *,
                    block_elems: int = 1 << 24, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks: ``i2t[Ni]`` of each image's best caption (-1 for images without captions)
    and ``t2i[Nt]`` of each caption's image. Similarities are dot products (pass unit vectors)."""
    img = torch.as_tensor(np.asarray(image_features) if not isinstance(image_features, torch.Tensor) else image_features).float()
    txt = torch.as_tensor(np.asarray(text_features) if not isinstance(text_features, torch.Tensor) else text_features).float()
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long).reshape(-1)
    ni, nt = img.shape[0], txt.shape[0]
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"image features {tuple(img.shape)} and text features {tuple(txt.shape)} must be [N, D] with equal D")
    if owner.shape[0] != nt:
        raise ValueError(f"text_to_image has {owner.shape[0]} entries for {nt} texts")
    if nt and (owner.min() < 0 or owner.max() >= ni):
        raise ValueError(f"text_to_image values must lie in [0, {ni}); got range [{int(owner.min())}, {int(owner.max())}]")

    # Score of each caption with its own image, and of each image with its best caption.
    pos = (img[owner] * txt).sum(dim=1) if nt else torch.zeros(0)
    best = torch.full((ni,), -torch.inf)
    if nt:
        best = best.scatter_reduce(0, owner, pos, reduce="amax")
    has_caption = torch.isfinite(best)

    i2t_rank = torch.zeros(ni, dtype=torch.long)
    t2i_rank = torch.zeros(nt, dtype=torch.long)
    side = max(1, int(block_elems ** 0.5))
    rows = max(1, min(ni, block_elems // max(1, min(nt, side))))
    cols = max(1, block_elems // rows)
    bar = tqdm(total=ni, desc="retrieval ranks", unit="img", disable=not progress)
    for i0, i1 in _blocks(ni, rows):
        ids = torch.arange(i0, i1)
        for j0, j1 in _blocks(nt, cols):
            sim = img[i0:i1] @ txt[j0:j1].t()                       # [r, c]
            positive = owner[j0:j1][None, :] == ids[:, None]        # the pair itself never counts
            i2t_rank[i0:i1] += ((sim > best[i0:i1, None]) & ~positive).sum(dim=1)
            t2i_rank[j0:j1] += ((sim > pos[None, j0:j1]) & ~positive).sum(dim=0)
        bar.update(i1 - i0)
    bar.close()
    i2t_rank[~has_caption] = -1
    return i2t_rank.numpy(), t2i_rank.numpy()


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    valid = ranks[ranks >= 0]
    return {k: float((valid < k).mean()) if valid.size else float("nan") for k in ks}


def retrieval_metrics(image_features: Any, text_features: Any, text_to_image: Any, *,
                      ks: Sequence[int] = DEFAULT_KS, block_elems: int = 1 << 24,
                      progress: bool = False) -> dict[str, float]:
    """CLIP_benchmark keys: ``image_retrieval_recall@K`` (text -> image) and
    ``text_retrieval_recall@K`` (image -> text), plus ``mean_recall`` and median ranks (1-based)."""
    i2t, t2i = retrieval_ranks(image_features, text_features, text_to_image, block_elems=block_elems, progress=progress)
    out: dict[str, float] = {}
    r_t2i, r_i2t = recall_from_ranks(t2i, ks), recall_from_ranks(i2t, ks)
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = r_t2i[k]
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = r_i2t[k]
    out["mean_recall"] = float(np.mean(list(r_t2i.values()) + list(r_i2t.values())))
    out["image_retrieval_median_rank"] = float(np.median(t2i + 1)) if t2i.size else float("nan")
    valid = i2t[i2t >= 0]
    out["text_retrieval_median_rank"] = float(np.median(valid + 1)) if valid.size else float("nan")
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
                text_batch_size: int = 256, progress: bool = False, total: int | None = None) -> PairFeatures:
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

    from .features import skippable_errors

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
    text = embed_texts_length_sorted(model, captions, batch_size=text_batch_size, progress=progress)
    t2 = time.perf_counter()
    img = torch.cat(feats) if feats else torch.empty(0, text.shape[1])
    return PairFeatures(F.normalize(img, dim=-1), text, np.asarray(owner, dtype=np.int64), keys,
                        len(skipped), skipped, {"image_embed": t1 - t0, "text_embed": t2 - t1})
