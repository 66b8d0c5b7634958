"""Batch-invariant query encoding: the same text or image gives the same bits whatever batch
it rode in (its companions, their number, its position).

Matrix kernels block by the shapes they get, so a row's last bits can change with the batch's
size, and the fast text tower trims each batch to its longest row. Here every model call has a
shape that depends on the row alone:

- images are encoded in chunks of exactly ``IMAGE_ROWS`` through the reference ViT computation
  (the fast tower's class-token-only last block makes a row's bits depend on its position),
  zero images padding the last chunk; other image towers (ResNets, families) one image per call;
- texts are packed end to end into chunks of exactly ``TEXT_TOKENS`` token rows (a text longer
  than that: alone in a chunk of the context length), each text at its own positions ``0..n-1``:
  the token-wise products (projections, MLP, LayerNorm) run on the whole fixed-shape chunk, where a
  row's bits do not depend on the other rows, and attention runs per text over its own ``n``
  tokens (causal), so nothing a text computes reads a companion. Only the tokens up to each
  text's end-of-text token are computed: no length buckets, no padding rows between texts.

Searches of an exact (flat, inner-product) FAISS index batch the same way
(:func:`search_flat_exact`): queries in chunks of exactly ``QUERY_ROWS`` (zero queries padding the
last), each chunk one matrix product against fixed blocks of ``SCAN_BLOCK`` stored vectors, then a
top-``fetch`` per query. The index is read once per chunk instead of once per query (a 100k x 512
flat index, 1 thread: 15 ms per query by FAISS alone; a chunk of 4 queries 22 ms, of 8 36 ms), and a
query's scores and ids do not depend on its companions. The scores equal FAISS's own to float32
rounding (a different summation order), the ids too except where two scores tie to that rounding.

Checked on the serving CPU by ``tests/search/test_exact.py`` (a query alone vs inside chunks with
other companions and at every position: equal bits). Other text towers (SigLIP, HF towers, ONNX
graphs; :func:`packs_text` is False) are encoded one text per call by the searcher: a shape fixed
by the text alone, hence exact too, without the batching gain; the same for image towers other
than clipforge's ViT.

A lone query pays for its chunk's padding rows (``IMAGE_ROWS`` images, ``TEXT_TOKENS`` tokens).
Packing replaced per-length buckets of ``64 // length`` rows (16 queries of ~11 tokens filled
~5 chunks of 60 token rows). 48 rows, measured on 1 thread (the server's encode thread) with
ViT-B/32: a lone query 69 ms (32 rows: 53, 64: 85), 16 queries 308 ms (32: 380, 64: 329), while
the fast tower's plain batch takes 37 / 223 ms with last bits that vary with the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..fast.transformer import FastAttention, FastBlock
from ..models.layers import Attention, ResidualAttentionBlock
from ..models.text import TextTransformer
from ..models.vision_vit import VisionTransformer
from ..tokenizer import tokenize

TEXT_TOKENS = 48                    # token rows per text chunk (a longer text: one chunk of the context length)
IMAGE_ROWS = 2                      # images per chunk
QUERY_ROWS = 4                      # queries per search chunk
SCAN_BLOCK = 1 << 16                # stored vectors per product of a search chunk


def packs_text(model: torch.nn.Module) -> bool:
    """Whether the text tower is clipforge's (plain or fast) pre-LN causal Transformer, whose
    blocks :func:`packed_text_features` can run token-wise (other towers: one text per call)."""
    text = getattr(model, "text", None)
    return (isinstance(text, TextTransformer) and hasattr(model, "context_length")
            and all(type(b) in (ResidualAttentionBlock, FastBlock) and type(b.attn) in (Attention, FastAttention)
                    for b in text.transformer.resblocks))


def _project(attn: Attention, x: torch.Tensor, which: str) -> torch.Tensor:
    """The fused ``qkv`` or the ``out`` projection (the fast attention's packed weights if it has them)."""
    if isinstance(attn, FastAttention):
        return attn.project(x, which)
    return F.linear(x, attn.in_proj_weight, attn.in_proj_bias) if which == "qkv" else attn.out_proj(x)


def _packed_block(block: ResidualAttentionBlock, x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """One pre-LN block over a packed chunk ``x`` [1, T, W]: products on all T rows, causal
    attention per text span ``(start, n)`` alone (rows outside every span: attention output 0)."""
    attn, (_, t, d) = block.attn, x.shape
    heads = attn.heads
    qkv = _project(attn, block.ln_1(x), "qkv")[0]  # [T, 3W]
    out = qkv.new_zeros(t, d)
    for s, n in spans:
        q, k, v = qkv[s:s + n].view(n, 3, heads, d // heads).permute(1, 2, 0, 3)  # each [H, n, hd]
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)  # [1, H, n, hd]
        out[s:s + n] = o[0].transpose(0, 1).reshape(n, d)
    x = x + _project(attn, out[None], "out")
    return x + block.mlp(block.ln_2(x))


def packed_text_features(text: TextTransformer, ids: list[torch.Tensor], tokens: int) -> torch.Tensor:
    """Texts (each [n_i] ids ending at its end-of-text token, sum n_i <= ``tokens``) -> [len, E]
    features, computed in one chunk of exactly ``tokens`` rows (see the module docstring)."""
    dtype = text.text_projection.dtype
    x = text.positional_embedding.new_zeros(1, tokens, text.positional_embedding.shape[1], dtype=dtype)
    spans, s = [], 0
    for row in ids:
        n = row.shape[0]
        x[0, s:s + n] = text.token_embedding(row).to(dtype) + text.positional_embedding[:n].to(dtype)
        spans.append((s, n))
        s += n
    for block in text.transformer.resblocks:
        x = _packed_block(block, x, spans)
    feats = text.ln_final(x)[0] @ text.text_projection  # [T, E]: every row, a shape fixed by the chunk
    return feats[[s + n - 1 for s, n in spans]]


def _pack(lengths: list[int], tokens: int, context: int) -> list[tuple[int, list[int]]]:
    """First-fit in order: (chunk rows, text indices) per chunk; a text over ``tokens`` alone in ``context`` rows."""
    chunks: list[tuple[int, list[int]]] = []
    room, current = 0, None
    for i, n in enumerate(lengths):
        if n > tokens:
            chunks.append((context, [i]))
            continue
        if current is None or n > room:
            current = (tokens, [])
            chunks.append(current)
            room = tokens
        current[1].append(i)
        room -= n
    return chunks


@torch.inference_mode()
def encode_texts_exact(model: torch.nn.Module, texts: list[str], tokenizer: Callable | None = None) -> torch.Tensor:
    """[B, D] L2-normalised float32 features of ``texts`` (truncated to the context), each text
    computed with bits that depend on that text alone."""
    if not packs_text(model):
        raise ValueError(f"packed exact encoding needs clipforge's text Transformer, not {type(getattr(model, 'text', model)).__name__}: "
                         "encode such towers one text per call")
    context = int(model.context_length)
    ids = tokenizer(texts, context, truncate=True) if tokenizer is not None else tokenize(texts, context, truncate=True)
    out = torch.empty(len(texts), int(model.config.embed_dim))
    device = model.device
    lengths = [int(e) + 1 for e in ids.argmax(dim=-1).tolist()]
    tokens = min(TEXT_TOKENS, context)
    for rows_, part in _pack(lengths, tokens, context):
        feats = packed_text_features(model.text, [ids[i, :lengths[i]].to(device) for i in part], rows_)
        out[part] = F.normalize(feats.float(), dim=-1).cpu()
    return out


@torch.inference_mode()
def encode_images_exact(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """[B, D] L2-normalised float32 features of preprocessed ``[3, S, S]`` images: a ViT tower in
    chunks of exactly ``IMAGE_ROWS`` (zero images pad the last one), other towers one per call."""
    vit = isinstance(getattr(model, "visual", None), VisionTransformer)
    rows = IMAGE_ROWS if vit else 1
    out = []
    for s in range(0, len(images), rows):
        part = images[s:s + rows]
        x = torch.stack(part + [torch.zeros_like(part[0])] * (rows - len(part)))
        if vit:
            x = VisionTransformer.forward(model.visual, x.to(device=model.device, dtype=model.dtype))
        else:
            x = model.encode_image(x)
        out.append(F.normalize(x[: len(part)].float(), dim=-1).cpu())
    if not out:
        return torch.empty(0, int(model.config.embed_dim))
    return torch.cat(out)


def flat_vectors(index: object) -> torch.Tensor | None:
    """The stored vectors of an exact inner-product FAISS index as a zero-copy ``[N, D]`` float32
    tensor (it lives as long as the index), or None for any other index (IVF, HNSW, compressed
    codes, L2, Milvus): those are searched by their own ``search``."""
    import faiss
    import numpy as np

    raw = getattr(index, "index", None)  # a LoadedIndex's faiss index
    if raw is None:
        return None
    flat = faiss.downcast_index(raw)
    if not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_INNER_PRODUCT or flat.ntotal == 0:
        return None
    view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)
    return torch.from_numpy(np.asarray(view).reshape(flat.ntotal, flat.d))


@torch.inference_mode()
def search_flat_exact(vectors: torch.Tensor, queries: torch.Tensor, fetch: int,
                      skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ids), each ``[B, min(fetch, N)]``, best first, of ``queries`` [B, D] against
    ``vectors`` [N, D] by inner product, in chunks of exactly ``QUERY_ROWS`` queries and blocks of
    ``SCAN_BLOCK`` vectors (shapes fixed by the index, never by the batch: a query's bits are its
    own). ``skip`` (bool [N]): ids never returned (deleted items; their rows score ``-inf`` and come
    last, id -1). Equal scores are listed by id."""
    n, d = vectors.shape
    fetch = min(fetch, n)
    b = queries.shape[0]
    scores, ids = torch.empty(b, fetch), torch.empty(b, fetch, dtype=torch.long)
    for s in range(0, b, QUERY_ROWS):
        chunk = torch.zeros(QUERY_ROWS, d)
        part = queries[s:s + QUERY_ROWS]
        chunk[: part.shape[0]] = part
        vals, idx = [], []
        for v0 in range(0, n, SCAN_BLOCK):
            sc = (vectors[v0:v0 + SCAN_BLOCK] @ chunk.T).T.contiguous()  # [Q, block]; the block as the
            # left operand: GEMM libraries pack the right one, and packing a block per chunk cost more than the product
            if skip is not None:
                sc.masked_fill_(skip[v0:v0 + SCAN_BLOCK], float("-inf"))
            top = torch.topk(sc, min(fetch, sc.shape[1]), dim=1)
            vals.append(top.values)
            idx.append(top.indices + v0)
        v, i = torch.cat(vals, 1), torch.cat(idx, 1)
        # best first, ties to the lower id: sort by id, then a stable sort by score
        by_id = torch.argsort(i, dim=1)
        v, i = torch.gather(v, 1, by_id), torch.gather(i, 1, by_id)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :fetch]
        v, i = torch.gather(v, 1, order), torch.gather(i, 1, order)
        i[torch.isneginf(v)] = -1
        m = part.shape[0]
        scores[s:s + m], ids[s:s + m] = v[:m], i[:m]
    return scores, ids
