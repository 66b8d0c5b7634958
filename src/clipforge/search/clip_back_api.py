"""clip-retrieval's back-end API (``clip_retrieval/clip_back.py``, 2.45.0) over a clipforge index,
so its ``ClipClient`` and its front end (clip-front) work against ``clipforge serve``:

- ``POST /knn-service``: the request ``ClipClient`` and clip-front send (any content type, like
  clip_back's ``get_json(force=True)``); results are clip_back's: the first ``num_images`` with the
  metadata columns ``url``/``image_path``/``caption``/``NSFW`` that exist plus ``image`` (base64
  JPEG: our thumbnail, where clip_back re-encodes the full image), then ``id`` and ``similarity``;
  the rest up to ``num_result_ids`` with ``id`` and ``similarity`` only. ``deduplicate`` is
  clip_back's (cosine >= 0.94 components over the result embeddings).
- ``GET /indices-list``: the index names;  ``POST /metadata``: ``[{"id", "metadata"}]`` for ids.

Differences, each refused with a clear 4xx instead of clip_back's 500: an unknown
``indice_name`` or a ``modality`` the chosen index does not hold is 404 (no ``indice_name``: the
server's first index); ``image_url`` is refused (this
server fetches no URLs); ``embedding_input`` must be ``dim`` numbers in [-1, 1]. Accepted and
ignored (no such models here): ``use_mclip``, ``use_safety_model``, ``use_violence_detector``,
``aesthetic_score``/``aesthetic_weight``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from .http import ERRORS, WorkerPool, check_unicode, decode_query_image, parse_json, public_path, whole
from .searcher import QueryError, Searcher
from .thumbnails import ThumbnailError

KNN_COLUMNS = ("url", "image_path", "caption", "NSFW")  # clip_back's default columns_to_return


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` request (``ClipClient`` and its front end send all of it);
    validated strictly so a wrong type is a 422, never coerced."""

    model_config = ConfigDict(strict=True)
    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: str                    # required, as clip_back reads them with json_data[...]
    num_images: int = Field(ge=0)
    indice_name: str | None
    num_result_ids: int | None = Field(None, ge=0)
    use_mclip: bool | None = False
    deduplicate: bool | None = False
    use_safety_model: bool | None = False
    use_violence_detector: bool | None = False
    aesthetic_score: int | str | None = ""
    aesthetic_weight: float | str | None = ""


def knn_request_schema(kinds: list[str], names: list[str], dim: int, max_images: int, max_ids: int) -> dict[str, Any]:
    """What ``/knn-service`` takes: exactly one of a text, a base64 image or an embedding
    (clip_back's precedence: a non-empty text, then the image, then the embedding)."""
    null = {"type": "null"}
    no_text = {"anyOf": [null, {"type": "string", "maxLength": 0}]}
    flag = {"anyOf": [{"type": "boolean"}, null]}
    common = {
        "modality": {"type": "string", "enum": kinds, "description": "image or text embeddings (the index's kind)"},
        "num_images": {"type": "integer", "minimum": 0, "maximum": max_images,
                       "description": "results returned with their metadata"},
        "num_result_ids": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": max_ids}, null],
                           "description": "results returned (ids and similarities); default num_images"},
        "indice_name": {"anyOf": [{"type": "string", "enum": names}, null]},
        "use_mclip": flag, "deduplicate": flag,
        "use_safety_model": {**flag, "description": "accepted, no safety model here"},
        "use_violence_detector": {**flag, "description": "accepted, no violence detector here"},
        "aesthetic_score": {"anyOf": [{"type": "integer"}, {"type": "string"}, null],
                            "description": "accepted, ignored (no aesthetic embeddings here)"},
        "aesthetic_weight": {"anyOf": [{"type": "number"}, {"type": "string"}, null],
                             "description": "accepted, ignored"},
        "image_url": {**null, "description": "not supported: this server fetches no URLs"},
    }
    text = {"type": "string", "pattern": "\\S", "description": "text query (truncated to the model's context)"}
    image = {"type": "string", "format": "byte", "minLength": 4, "description": "base64 image (JPEG, PNG, ...)",
             "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"}
    ignored = {"description": "ignored when a text is given (clip_back's precedence)"}
    emb = {"type": "array", "minItems": dim, "maxItems": dim, "items": {"type": "number", "minimum": -1, "maximum": 1},
           "description": "query embedding (searched as given, like clip_back)"}
    return {"title": "KnnRequest", "type": "object", "required": ["modality", "num_images", "indice_name"],
            "oneOf": [
        {"required": ["text"], "properties": {**common, "text": text,
                                              "image": {"anyOf": [{"type": "string"}, null], **ignored},
                                              "embedding_input": {"anyOf": [{"type": "array", "items": {
                                                  "type": "number"}}, null], **ignored}}},
        {"required": ["image"], "properties": {**common, "text": no_text, "image": image,
                                               "embedding_input": {"anyOf": [emb, null]}}},
        {"required": ["embedding_input"], "properties": {**common, "text": no_text, "image": null,
                                                          "embedding_input": emb}},
    ]}


def metadata_request_schema(names: list[str], ntotal: int, max_ids: int) -> dict[str, Any]:
    return {"title": "MetadataRequest", "type": "object", "required": ["ids"], "properties": {
        "ids": {"type": "array", "maxItems": max_ids,
                "items": {"type": "integer", "minimum": 0, "maximum": max(ntotal - 1, 0)}},
        "indice_name": {"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]}}}


class MetadataRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    ids: list[int]
    indice_name: str | None = None


class ClipBack:
    """The work behind clip_back's endpoints over ``served`` (name -> an object with ``searcher``
    and ``thumbs``; the first is the default): request bodies in, JSON-able results out. Runs in
    the server's worker pool (it embeds queries and reads the index)."""

    def __init__(self, served: dict[str, Any], *, max_upload_bytes: int, max_result_ids: int,
                 knn_columns: tuple[str, ...] = KNN_COLUMNS, decode_image: Any = decode_query_image,
                 embed_text: Callable[[str], np.ndarray] | None = None,
                 embed_image: Callable[[Any], np.ndarray] | None = None,
                 search_hits: Callable[[Any, np.ndarray, int], list[Any]] | None = None) -> None:
        self.served, self.names = served, list(served)
        self.search_hits = search_hits
        self.first = served[self.names[0]]
        self.searcher: Searcher = self.first.searcher  # model-level work (embedding a query) goes through the first
        self.embed_text = embed_text or self.searcher.embed_text
        self.embed_image = embed_image or self.searcher.embed_image
        self.max_upload_bytes, self.max_result_ids = max_upload_bytes, max_result_ids
        self.knn_columns, self.decode_image = knn_columns, decode_image

    # --- the endpoints -------------------------------------------------------------------------
    def knn_query(self, body: bytes) -> list[dict[str, Any]]:
        """``/knn-service``: the nearest items of a text, image or embedding, clip_back's way."""
        req, sv = self.parse_request(body, KnnRequest, ("num_images", "num_result_ids", "aesthetic_score"))
        num_images, num_ids = self.result_counts(req, sv)
        query = self.query_vector(req)
        if num_ids == 0:
            return []
        if self.search_hits is not None and num_ids <= sv.searcher.max_k:  # the service's batched search
            hits = self.search_hits(sv, query, num_ids)
            scores = np.array([h.score for h in hits], dtype=np.float32)
            ids = np.array([h.id for h in hits], dtype=np.int64)
            scores, ids = self.deduplicate(sv.searcher.index, scores, ids, bool(req.deduplicate))
        else:
            scores, ids = self.search(sv.searcher.index, query, num_ids, bool(req.deduplicate))
        rows = sv.searcher.index.rows(ids[:num_images].tolist())
        return [{**(self.item_metadata(sv, i, rows[j]) if j < len(rows) else {}), "id": i, "similarity": s}
                for j, (i, s) in enumerate(zip(ids.tolist(), scores.tolist()))]

    def metadata_query(self, body: bytes) -> list[dict[str, Any]]:
        """``/metadata``: ``[{"id", "metadata"}]`` of result ids."""
        req, sv = self.parse_request(body, MetadataRequest, ("ids",))
        if not req.ids:
            return []
        if len(req.ids) > self.max_result_ids:
            raise QueryError(f"at most {self.max_result_ids} ids per request, got {len(req.ids)}")
        ids = [sv.searcher.check_id(i) for i in req.ids]
        rows = sv.searcher.index.rows(ids)
        return [{"id": i, "metadata": self.item_metadata(sv, i, r)} for i, r in zip(ids, rows)]

    # --- requests ------------------------------------------------------------------------------
    def parse_request(self, body: bytes, model_cls: type[BaseModel], int_fields: tuple[str, ...]) -> tuple[Any, Any]:
        """Parse and strictly validate a clip-retrieval request; integers may come as whole floats;
        an ``indice_name`` must be this server's. Returns the request and the index it names."""
        data = parse_json(body)
        if not isinstance(data, dict):
            raise QueryError(f"request body must be a JSON object ({model_cls.__name__})")
        for f in int_fields:
            if isinstance(data.get(f), list):
                data[f] = [whole(v) for v in data[f]]
            elif f in data:
                data[f] = whole(data[f])
        try:
            req = model_cls.model_validate(data)
        except ValueError as e:
            raise QueryError(f"invalid {model_cls.__name__}: {e}".replace("\n", "; ")) from None
        if req.indice_name is not None and req.indice_name not in self.served:
            raise QueryError(f"unknown indice_name {req.indice_name!r}; this server has {self.names}", status=404)
        return req, self.served[req.indice_name] if req.indice_name is not None else self.first

    def result_counts(self, req: KnnRequest, sv: Any) -> tuple[int, int]:
        """``(num_images, num_result_ids)`` after checking them and the modality against the index."""
        kind = sv.searcher.index.info["kind"]
        if req.modality != kind:
            raise QueryError(f"modality {req.modality!r} is not available: index {sv.name!r} holds "
                             f"{kind} embeddings (use modality {kind!r})", status=404)
        num_images = req.num_images
        num_ids = req.num_result_ids if req.num_result_ids is not None else num_images
        if num_images > self.searcher.max_k:
            raise QueryError(f"num_images must be at most {self.searcher.max_k}, got {num_images}")
        if num_ids > self.max_result_ids:
            raise QueryError(f"num_result_ids must be at most {self.max_result_ids}, got {num_ids}")
        return num_images, num_ids

    def query_vector(self, req: KnnRequest) -> np.ndarray:
        """The query embedding, by clip_back's precedence: a non-empty text, then the image, then the
        embedding; the inputs below the one used are checked (as the schema says) only when they are
        the query."""
        if req.image_url is not None:
            raise QueryError("image_url queries are not supported (this server fetches no URLs): "
                             "send the image base64-encoded in 'image'")
        if req.text is not None and req.text != "":
            return self.embed_text(check_unicode(req.text))  # truncated to the context, like clip_back
        if req.image is not None:
            if req.embedding_input is not None:
                self.check_embedding(req.embedding_input)
            return self.embed_image(self.decode_image(self.image_bytes(req.image), "image"))
        if req.embedding_input is not None:
            return self.check_embedding(req.embedding_input)
        raise QueryError("must fill one of text, image and embedding_input")

    def image_bytes(self, b64: str) -> bytes:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise QueryError("'image' is not valid base64") from None
        if len(raw) > self.max_upload_bytes:
            raise QueryError(f"image exceeds the limit of {self.max_upload_bytes} bytes", status=413)
        return raw

    def check_embedding(self, values: list[float]) -> np.ndarray:
        dim = self.searcher.index.info["dim"]
        emb = np.asarray(values, dtype=np.float64)
        if emb.shape != (dim,) or not (np.abs(emb) <= 1).all():
            raise QueryError(f"embedding_input must be {dim} numbers within [-1, 1] (an L2-normalised "
                             f"embedding), got {emb.shape[0]} numbers")
        return emb.astype(np.float32)

    # --- results -------------------------------------------------------------------------------
    @staticmethod
    def search(index: Any, query: np.ndarray, k: int, deduplicate: bool) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids of the ``k`` nearest items (fewer where the index has fewer), with
        clip_back's near-duplicate removal when asked."""
        scores, ids = index.search(query[None, :], k)
        keep = ids[0] >= 0
        return ClipBack.deduplicate(index, scores[0][keep], ids[0][keep], deduplicate)

    @staticmethod
    def deduplicate(index: Any, scores: np.ndarray, ids: np.ndarray, deduplicate: bool) -> tuple[np.ndarray, np.ndarray]:
        """clip_back's near-duplicate removal over found ``ids`` (when asked)."""
        if deduplicate and len(ids):
            drop = near_duplicates(np.stack([index.vector(int(i)) for i in ids]))
            sel = np.array([j for j in range(len(ids)) if j not in drop], dtype=np.int64)
            scores, ids = scores[sel], ids[sel]
        return scores, ids

    def item_metadata(self, sv: Any, item_id: int, row: dict[str, Any]) -> dict[str, Any]:
        """The item's clip_back columns that exist, ``image_path`` as the item's key, and ``image``."""
        out = {c: row[c] for c in self.knn_columns if c in row}
        if "image_path" in out:  # never the server's absolute path: the item's key (relative) instead
            out["image_path"] = public_path(row.get("key")) if out["image_path"] else None
        img = thumbnail_b64(sv, item_id, row)
        if img is not None:
            out["image"] = img
        return out


def thumbnail_b64(sv: Any, item_id: int, row: dict[str, Any]) -> str | None:
    """clip_back sends the local image as base64 JPEG under ``image``; we send the thumbnail."""
    if sv.searcher.index.info["kind"] != "image" or not row.get("image_path"):
        return None
    try:
        return base64.b64encode(sv.thumbs.thumbnail(item_id, row)).decode("ascii")
    except ThumbnailError:
        return None


def add_clip_back_routes(app: FastAPI, served: dict[str, Any], pool: WorkerPool, *,
                         max_upload_bytes: int, max_result_ids: int,
                         knn_columns: tuple[str, ...] = KNN_COLUMNS, decode_image: Any = decode_query_image,
                         embed_text: Callable[[str], np.ndarray] | None = None,
                         embed_image: Callable[[Any], np.ndarray] | None = None,
                         search_hits: Callable[[Any, np.ndarray, int], list[Any]] | None = None) -> None:
    """Register /knn-service, /indices-list and /metadata on ``app`` over ``served`` (name ->
    an object with ``searcher`` and ``thumbs``; the first is the default); ``decode_image``:
    bytes, name -> PIL image, with the server's pixel limit; ``embed_text`` / ``embed_image``
    (called in a worker thread): how a query is embedded, e.g. through the service's batchers
    (default: the first searcher's own model call); ``search_hits(served index, vector, k)``: how
    up to ``max_k`` results are searched, e.g. through the service's search batcher (default, and
    for more results: the index's own search)."""
    api = ClipBack(served, max_upload_bytes=max_upload_bytes, max_result_ids=max_result_ids,
                   knn_columns=knn_columns, decode_image=decode_image, embed_text=embed_text,
                   embed_image=embed_image, search_hits=search_hits)
    kinds = sorted({sv.searcher.index.info["kind"] for sv in served.values()})
    knn_schema = knn_request_schema(kinds, api.names, api.searcher.index.info["dim"], api.searcher.max_k,
                                    max_result_ids)
    metadata_schema = metadata_request_schema(api.names, max(sv.searcher.index.ntotal for sv in served.values()),
                                              max_result_ids)

    @app.post("/knn-service", summary="clip-retrieval's nearest-neighbour query (ClipClient, clip-front)",
              response_model=list[dict[str, Any]], responses=ERRORS, openapi_extra=_json_body(knn_schema))
    async def knn_service(request: Request) -> Any:
        return await pool.run(api.knn_query, await request.body())  # any content type, like clip_back's force=True

    @app.get("/indices-list", summary="clip-retrieval's list of index names", response_model=list[str])
    async def indices_list() -> list[str]:
        return api.names

    @app.post("/metadata", summary="clip-retrieval's metadata of result ids (clip-front)",
              response_model=list[dict[str, Any]], responses=ERRORS, openapi_extra=_json_body(metadata_schema))
    async def metadata(request: Request) -> Any:
        return await pool.run(api.metadata_query, await request.body())


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI's description of a required JSON request body of ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def near_duplicates(vectors: np.ndarray, threshold: float = 0.94) -> set[int]:
    """clip_back's ``connected_components_dedup``: rows joined by cosine >= ``threshold`` form
    groups; all but each group's first row (in result order) are dropped."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    lims, _, nbr = flat.range_search(x, threshold)
    neighbours = {i: [int(j) for j in nbr[lims[i]:lims[i + 1]]] for i in range(len(x))}
    seen: set[int] = set()
    drop: set[int] = set()
    for start in range(len(x)):
        if start in seen:
            continue
        stack, group = [start], []
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            group.append(node)
            stack.extend(j for j in neighbours.get(node, []) if j not in seen)
        drop.update(g for g in group if g != start)
    return drop
