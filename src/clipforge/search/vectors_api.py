"""``POST /embed`` and ``POST /rank``: the model as a service beside the index.

- ``/embed``: texts and/or base64 images -> L2-normalised embeddings, as JSON lists or as base64
  of little-endian float32 / float16 arrays (``encoding``, ``dtype``).
- ``/rank``: one query (text or image) against candidate texts or images -> cosine ``scores``,
  CLIP's ``logits`` (``exp(logit_scale) * cosine`` (+ ``logit_bias``)) and ``probs``: a softmax
  over the candidates (CLIP's zero-shot classification), or an independent sigmoid per
  candidate when the model has a ``logit_bias`` (SigLIP-style models).

Every text and image is one item of the cross-request batchers (:mod:`.batching`), so a request
with many items shares batches with everyone else's; ``max_items`` caps each list.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from typing import Any, Awaitable, Callable

import numpy as np
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel

from .http import ERRORS, WorkerPool, check_unicode, parse_json
from .searcher import QueryError, Searcher

B64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class EmbedResponse(BaseModel):
    model: str
    dim: int
    encoding: str
    dtype: str
    texts: list[Any]
    images: list[Any]


class RankResponse(BaseModel):
    activation: str
    logit_scale: float
    logit_bias: float | None = None
    scores: list[float]
    logits: list[float]
    probs: list[float]


def _lists(max_items: int) -> tuple[dict[str, Any], dict[str, Any]]:
    text = {"type": "string", "pattern": "\\S", "description": "a text (tokens beyond the context are dropped)"}
    image = {"type": "string", "format": "byte", "minLength": 4, "pattern": B64, "description": "base64 image"}
    return ({"type": "array", "items": text, "minItems": 1, "maxItems": max_items},
            {"type": "array", "items": image, "minItems": 1, "maxItems": max_items})


def embed_request_schema(max_items: int) -> dict[str, Any]:
    texts, images = _lists(max_items)
    props = {"texts": texts, "images": images,
             "encoding": {"type": "string", "enum": ["json", "base64"], "default": "json",
                          "description": "json: lists of numbers; base64: little-endian arrays of dtype"},
             "dtype": {"type": "string", "enum": ["float32", "float16"], "default": "float32"}}
    return {"title": "EmbedRequest", "type": "object", "additionalProperties": False, "properties": props,
            "anyOf": [{"required": ["texts"]}, {"required": ["images"]}]}


def rank_request_schema(max_items: int) -> dict[str, Any]:
    texts, images = _lists(max_items)
    query = {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["text"],
         "properties": {"text": texts["items"]}},
        {"type": "object", "additionalProperties": False, "required": ["image"],
         "properties": {"image": images["items"]}}]}
    return {"title": "RankRequest", "oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["query", "texts"],
         "properties": {"query": query, "texts": texts}},
        {"type": "object", "additionalProperties": False, "required": ["query", "images"],
         "properties": {"query": query, "images": images}}]}


def encode_vectors(vectors: list[np.ndarray], encoding: str, dtype: str) -> list[Any]:
    out = []
    for v in vectors:
        a = np.asarray(v, dtype=np.float32).astype("<f4" if dtype == "float32" else "<f2")
        out.append(a.astype(np.float64).tolist() if encoding == "json" else base64.b64encode(a.tobytes()).decode())
    return out


def rank_scores(query: np.ndarray, candidates: np.ndarray, logit_scale: float,
                logit_bias: float | None) -> dict[str, Any]:
    """Cosine scores, logits and probabilities of ``candidates`` [N, D] for ``query`` [D]."""
    scores = candidates.astype(np.float64) @ query.astype(np.float64)
    logits = logit_scale * scores + (logit_bias or 0.0)
    if logit_bias is None:
        e = np.exp(logits - logits.max())
        probs, activation = e / e.sum(), "softmax"
    else:
        probs, activation = 1.0 / (1.0 + np.exp(-logits)), "sigmoid"
    return {"activation": activation, "logit_scale": logit_scale, "logit_bias": logit_bias,
            "scores": scores.tolist(), "logits": logits.tolist(), "probs": probs.tolist()}


def model_logits(model: torch.nn.Module) -> tuple[float, float | None]:
    """(exp(logit_scale), logit_bias or None) as the model's forward applies them."""
    scale = float(model.logit_scale.detach().float().exp()) if hasattr(model, "logit_scale") else 1.0
    bias = getattr(model, "logit_bias", None)
    bias = float(bias.detach().float()) if isinstance(bias, torch.Tensor) else (float(bias) if bias is not None else None)
    return scale, bias


def add_vector_routes(app: FastAPI, searcher: Searcher, pool: WorkerPool, *, max_items: int,
                      max_upload_bytes: int, decode_image: Callable[[bytes, str], Any],
                      encode: Callable[[Request, str, Any], Awaitable[np.ndarray]]) -> None:
    """Register /embed and /rank; ``encode(request, "text" | "image", value)`` runs one item
    through its batcher (texts as checked strings, images as preprocessed tensors)."""
    offload = pool.run
    model = searcher.model
    dim = int(model.config.embed_dim)

    def texts_of(value: Any, field: str) -> list[str]:
        if not isinstance(value, list) or not value:
            raise QueryError(f"{field} must be a non-empty list of strings")
        if len(value) > max_items:
            raise QueryError(f"{field} holds {len(value)} items; at most {max_items} per request")
        out = []
        for i, t in enumerate(value):
            if not isinstance(t, str):
                raise QueryError(f"{field}[{i}] must be a string, got {type(t).__name__}")
            check_unicode(t, f"{field}[{i}]")
            out.append(searcher.text_tokens(t)[0])
        return out

    def images_of(value: Any, field: str) -> list[torch.Tensor]:
        if not isinstance(value, list) or not value:
            raise QueryError(f"{field} must be a non-empty list of base64 images")
        if len(value) > max_items:
            raise QueryError(f"{field} holds {len(value)} items; at most {max_items} per request")
        out = []
        for i, b in enumerate(value):
            if not isinstance(b, str):
                raise QueryError(f"{field}[{i}] must be a base64 string, got {type(b).__name__}")
            try:
                raw = base64.b64decode(b, validate=True)
            except (binascii.Error, ValueError):
                raise QueryError(f"{field}[{i}] is not valid base64") from None
            if len(raw) > max_upload_bytes:
                raise QueryError(f"{field}[{i}] exceeds the limit of {max_upload_bytes} bytes", status=413)
            out.append(searcher.preprocess(decode_image(raw, f"{field}[{i}]")))
        return out

    def parse_embed(body: bytes) -> tuple[list[str], list[torch.Tensor], str, str]:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise QueryError('request body must be a JSON object like {"texts": ["a dog"]}')
        unknown = set(data) - {"texts", "images", "encoding", "dtype"}
        if unknown:
            raise QueryError(f"unknown field(s) {sorted(unknown)}; use texts, images, encoding, dtype")
        if data.get("texts") is None and data.get("images") is None:
            raise QueryError("nothing to embed: give 'texts' and/or 'images'")
        encoding, dtype = data.get("encoding", "json"), data.get("dtype", "float32")
        if encoding not in ("json", "base64"):
            raise QueryError(f"encoding must be 'json' or 'base64', got {encoding!r}")
        if dtype not in ("float32", "float16"):
            raise QueryError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        texts = texts_of(data["texts"], "texts") if "texts" in data else []
        images = images_of(data["images"], "images") if "images" in data else []
        return texts, images, encoding, dtype

    async def encode_all(request: Request, texts: list[str], images: list[torch.Tensor]) -> tuple[list, list]:
        got = await asyncio.gather(*(encode(request, "text", t) for t in texts),
                                   *(encode(request, "image", x) for x in images))
        return list(got[:len(texts)]), list(got[len(texts):])

    @app.post("/embed", summary="Embed texts and/or images (L2-normalised vectors)", response_model=EmbedResponse,
              responses=ERRORS, openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": embed_request_schema(max_items)}}}})
    async def embed(request: Request) -> Any:
        texts, images, encoding, dtype = await offload(parse_embed, await request.body())
        tv, iv = await encode_all(request, texts, images)
        return {"model": model.config.name, "dim": dim, "encoding": encoding, "dtype": dtype,
                "texts": encode_vectors(tv, encoding, dtype), "images": encode_vectors(iv, encoding, dtype)}

    def parse_rank(body: bytes) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise QueryError('request body must be a JSON object like {"query": {"image": "..."}, "texts": [...]}')
        unknown = set(data) - {"query", "texts", "images"}
        if unknown:
            raise QueryError(f"unknown field(s) {sorted(unknown)}; use query and texts or images")
        q = data.get("query")
        if not isinstance(q, dict) or len(q) != 1 or not set(q) <= {"text", "image"}:
            raise QueryError('query must be {"text": "..."} or {"image": "<base64>"}')
        if ("texts" in data) == ("images" in data):
            raise QueryError("give exactly one candidate list: 'texts' or 'images'")
        qt = texts_of([q["text"]], "query.text") if "text" in q else []
        qi = images_of([q["image"]], "query.image") if "image" in q else []
        ct = texts_of(data["texts"], "texts") if "texts" in data else []
        ci = images_of(data["images"], "images") if "images" in data else []
        return qt, qi, ct, ci

    @app.post("/rank", summary="Score candidate texts or images against one query (zero-shot as a service)",
              response_model=RankResponse, responses=ERRORS, openapi_extra={"requestBody": {"required": True,
                                                                            "content": {"application/json": {
                                                                                "schema": rank_request_schema(
                                                                                    max_items)}}}})
    async def rank(request: Request) -> Any:
        qt, qi, ct, ci = await offload(parse_rank, await request.body())
        q = (await encode_all(request, qt, []))[0][0] if qt else (await encode_all(request, [], qi))[1][0]
        tv, iv = await encode_all(request, ct, ci)
        scale, bias = model_logits(model)
        out = rank_scores(q, np.stack(tv or iv), scale, bias)
        if not all(math.isfinite(v) for v in out["probs"]):
            raise QueryError("scores are not finite (the model's weights hold NaN or inf)", status=422)
        return out
