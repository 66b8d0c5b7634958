"""clipforge's image-caption selection scores against CLIP_benchmark 1.6.2's own
``clip_benchmark.metrics.image_caption_selection.evaluate`` on the same model outputs.

Both sides read one table of embeddings (a tiny random CLIP's, computed once by clipforge), so
any difference is in the scoring: which image goes with which caption, the argmax and its tie
rule, the aggregation. Instances of three shapes: 2 images x 2 captions (the built-in minimal
pairs), 1 x 2 (SugarCREPE) and 1 x 3 (a JSONL line with two negatives); a few exact ties.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("clip_benchmark")
ics = pytest.importorskip("clip_benchmark.metrics.image_caption_selection")

from clipforge.eval.selection import (SelectionInstance, builtin_selection, selection_metrics,  # noqa: E402
                                      selection_similarities)
from clipforge.preprocess import image_transform  # noqa: E402
from clipforge.tokenizer import get_tokenizer  # noqa: E402


class LookupModel(torch.nn.Module):
    """encode_image / encode_text that return stored embeddings for stored inputs (exact)."""

    def __init__(self, config, images: dict[bytes, torch.Tensor], texts: dict[tuple, torch.Tensor]) -> None:
        super().__init__()
        self.config, self.images, self.texts = config, images, texts
        self.device, self.context_length = torch.device("cpu"), 77

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.stack([self.images[t.contiguous().numpy().tobytes()] for t in x])

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.stack([self.texts[tuple(r.tolist())] for r in ids])


@pytest.mark.slow
def test_scores_equal_clip_benchmark_evaluate():
    import clipforge

    model = clipforge.create_model("tiny-vit", seed=0).eval()
    pre = image_transform(model.config.preprocess)
    tok = get_tokenizer()
    pairs = builtin_selection("builtin:scenes-selection?n_per_type=6&size=32").instances
    singles = [SelectionInstance([inst.images[0]], inst.captions, inst.type) for inst in pairs[:12]]
    triples = [SelectionInstance([inst.images[1]], [inst.captions[1], inst.captions[0], "a picture of two objects."],
                                 inst.type) for inst in pairs[12:]]
    groups = {"pairs": pairs, "singles": singles, "triples": triples}

    # our embeddings, then made to tie in a few instances (the tie rule must agree too)
    tensors = {id(im): pre(im) for insts in groups.values() for inst in insts for im in inst.images}
    with torch.no_grad():
        img = {k: F.normalize(model.encode_image(t[None]), dim=-1)[0] for k, t in tensors.items()}
        texts = sorted({c for insts in groups.values() for inst in insts for c in inst.captions})
        txt = dict(zip(texts, F.normalize(model.encode_text(tok.tokenize(texts)), dim=-1)))
    for inst in pairs[:3]:
        img[id(inst.images[1])] = img[id(inst.images[0])]  # identical images: every caption ties
    lookup = LookupModel(model.config, {tensors[k].numpy().tobytes(): v for k, v in img.items()},
                         {tuple(tok.tokenize([c])[0].tolist()): v for c, v in txt.items()})

    for name, insts in groups.items():
        sims, kept, skipped = selection_similarities(lookup, insts, preprocess=pre, batch_size=4)
        assert len(kept) == len(insts) and not skipped
        ours, _ = selection_metrics(sims)
        items = [(torch.stack([tensors[id(im)] for im in inst.images]), inst.captions) for inst in insts]
        loader = torch.utils.data.DataLoader(items, batch_size=4, collate_fn=lambda b: (
            torch.stack([x for x, _ in b]), [c for _, c in b]))
        theirs = ics.evaluate(lookup, loader, tok.tokenize, device="cpu", amp=False)
        assert set(theirs) == set(ours), name
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-7), (name, key, ours, theirs)
