"""schemathesis over the service's own OpenAPI document, in-process (ASGI), with every check it
has: no 5xx, every status documented, bodies match their schemas, schema-valid requests accepted,
schema-invalid ones refused. Deterministic (derandomize) and bounded (max_examples).

Driven through schemathesis's Python API (each operation's Hypothesis strategy under ``@given``), not
its pytest plugin: the plugin rewrites pytest's private ``Node._nodeid``, which pytest 9.2 removed, so
the plugin breaks whenever pytest changes its internals; the public strategy API does not."""

from __future__ import annotations

import base64
import binascii
import io

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from search.searchutil import make_image_folder, micro_model

from clipforge.search.embed import embed_collection
from clipforge.search.index import build_index
from clipforge.search.service import create_app
from clipforge.search.sources import ImageFolderSource

_buf = io.BytesIO()
Image.new("RGB", (20, 16), (200, 30, 30)).save(_buf, "PNG")
PNG = _buf.getvalue()


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    model = micro_model()
    make_image_folder(d / "photos")
    embed_collection(model, ImageFolderSource(d / "photos"), d / "emb", shard_size=5, progress=False,
                     rank=0, world_size=1)
    build_index(d / "emb", d / "idx", n_queries=5, progress=False)
    app = create_app(d / "idx", model, max_k=20, max_upload_bytes=50_000)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _png_if_base64(value):
    if not isinstance(value, str):
        return value
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value
    return base64.b64encode(PNG).decode()


def real_images(case) -> None:
    """A schema-valid base64 image (``image`` of /knn-service, ``images`` of /embed and /rank, a
    /rank ``query.image``) becomes a real PNG: any base64 is valid for the schema, only images are
    accepted (invalid base64 is left alone, to be refused)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if case.operation.path == "/knn-service" and isinstance(body.get("image"), str):
        case.body = {**body, "image": _png_if_base64(body["image"])}
    elif case.operation.path in ("/embed", "/rank"):
        body = dict(body)
        if isinstance(body.get("images"), list):
            body["images"] = [_png_if_base64(v) for v in body["images"]]
        if isinstance(body.get("query"), dict) and "image" in body["query"]:
            body["query"] = {**body["query"], "image": _png_if_base64(body["query"]["image"])}
        case.body = body


def check(case) -> None:
    real_images(case)
    if case.media_type == "multipart/form-data":
        # any bytes are a schema-valid upload (schemathesis cannot make images there): a non-image
        # gets the documented 415, so only "schema-valid request accepted" is left out, here only
        from schemathesis.specs.openapi.checks import positive_data_acceptance

        case.call_and_validate(excluded_checks=[positive_data_acceptance])
    else:
        case.call_and_validate()


def fuzz(schema, max_examples: int) -> list[str]:
    """Every operation of ``schema``, schema-valid and schema-invalid requests alike (schemathesis's
    default modes), ``max_examples`` each; returns the operations' labels (all were exercised)."""
    from schemathesis import GenerationMode

    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()  # an operation the schema cannot describe raises here, naming it
        strategy = st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode])

        @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            check(case)

        try:
            run()
        except Exception as e:
            raise AssertionError(f"{operation.label}: {e}") from e
        labels.append(operation.label)
    return labels


def test_api_conforms(api_schema):
    labels = fuzz(api_schema, max_examples=25)
    assert {"POST /knn-service", "POST /embed", "POST /rank", "GET /health"} <= set(labels), labels


@pytest.mark.slow
def test_api_conforms_thorough(api_schema):
    fuzz(api_schema, max_examples=200)
