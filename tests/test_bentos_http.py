"""The bentos as BentoML users meet them, and the BentoML behaviour ``bentos.http`` relies on.

* BentoML's own answers to bad input, pinned on a bare service without the gate: if an
  upgrade changes them, these fail and say which assumption of bentos/http.py broke.
* ``bentos.http``'s pure parts: the upload check and the error translation.
* Over real HTTP, both bentos: ``bentoml.SyncHTTPClient``/``AsyncHTTPClient`` call every
  endpoint by name, ``/docs.json`` documents them, and adaptive batching (on) answers
  each request alone, bad images included.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import pytest
from bentoml.exceptions import InvalidArgument, ServiceUnavailable

from bentos.http import RequestError, check_upload, contract_error
from harness.launch import free_port, service_process
from weather.contract import IMAGE_FIELD, PREDICT_ROUTE, RAW_ROUTE, UPLOAD_ROUTE
from weather.endpoints import ENDPOINTS, multipart
from weather.photos import photo_paths
from weather.registry import BENTOS

with warnings.catch_warnings():  # starlette would like httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


# --- BentoML's own shapes, on a service with the same parameter types and no gate ----------


@bentoml.service(name="BareShapes")
class BareShapes:
    @bentoml.api(route="/json")
    def json_api(self, image: str) -> str:
        if image == "invalid":
            raise InvalidArgument("the message")
        if image == "unavailable":
            raise ServiceUnavailable("the message")
        return "ok"

    @bentoml.api(route="/upload")
    def upload(self, image: Path) -> str:
        return "ok"

    @bentoml.api(route="/raw")
    def raw(self, image: Path, /) -> str:
        return "ok"


@pytest.fixture(scope="module")
def bare() -> Iterator[TestClient]:
    # BentoML registers request metrics in a process-wide registry: one app per name and process.
    options = f"{os.environ.get('BENTOML_CONFIG_OPTIONS', '')} services.BareShapes.metrics.enabled=false".strip()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTOML_CONFIG_OPTIONS", options)
        with TestClient(BareShapes.to_asgi(), raise_server_exceptions=False) as client:
            yield client


@pytest.fixture
def url_server() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server serving a file, and the paths it was asked for."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/photo.jpg", hits
    server.shutdown()
    server.server_close()


# (JSON body, the pydantic error type BentoML reports, the contract's message for it)
VALIDATION_SHAPES = [
    (b"{", "json_invalid", "the body is not valid JSON"),
    (b"[1]", "model_type", "the body must be a JSON object"),
    (b"{}", "missing", f"'{IMAGE_FIELD}' is missing"),
    (b"", "missing", f"'{IMAGE_FIELD}' is missing"),  # BentoML reads an empty body as {}
    (b'{"image": 5}', "string_type", f"'{IMAGE_FIELD}' must be a string (standard base64)"),
]


@pytest.mark.parametrize(("body", "error_type", "message"), VALIDATION_SHAPES)
def test_bentoml_reports_bad_json_as_pydantic_details(bare, body, error_type, message):
    response = bare.post("/json", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"][0]["type"] == error_type  # what bentos.http maps from
    assert contract_error(400, response.content) == message


def test_bentoml_wraps_invalid_argument_in_a_list(bare):
    response = bare.post("/json", json={"image": "invalid"})
    assert response.status_code == 400
    assert response.json() == [{"error": "the message"}]  # bentoml/BentoML#5709; dicts are handled too
    assert contract_error(400, response.content) == "the message"
    assert contract_error(400, b'{"error": "the message"}') == "the message"


def test_bentoml_replaces_every_5xx_message(bare):
    response = bare.post("/json", json={"image": "unavailable"})
    assert response.status_code == 503
    assert "the message" not in response.text  # so the gate names a loading model itself
    assert "retry later" in contract_error(503, response.content)


# What BentoML answers 500 to, and the gate therefore refuses before BentoML parses.
@pytest.mark.parametrize(
    "case",
    ["no-boundary", "binary-part-under-another-name"],
)
def test_bentoml_answers_500_to_some_bad_uploads(bare, case):
    if case == "no-boundary":
        response = bare.post("/upload", content=b"abc", headers={"Content-Type": "multipart/form-data"})
    else:
        request = multipart([("image", "a.jpg", b"\xff\xd8\xff"), ("other", "b.bin", b"\xff\xfe\x00")])
        response = bare.post("/upload", content=request.body, headers=dict(request.headers))
    assert response.status_code == 500
    assert contract_error(500, response.content) == "internal error, see the server log"


def test_bentoml_tries_to_fetch_a_url_given_for_a_file(bare, url_server):
    url, hits = url_server
    # It does, even a loopback address, now that uvloop is installed (its make_safe_connect needs
    # it): a server-side request forgery. The gate refuses both bodies before BentoML sees them.
    for response in (
        bare.post("/upload", data={"image": url}),
        bare.post("/raw", content=url.encode(), headers={"Content-Type": "image/jpeg"}),
    ):
        assert response.status_code == 200, response.text
    assert len(hits) == 2, hits


# --- bentos.http's pure parts -------------------------------------------------------------


def test_upload_check_accepts_one_image_file_part():
    request = multipart([(IMAGE_FIELD, "photo.jpg", b"\xff\xd8\xff data")])
    boundary = request.headers["Content-Type"].split("boundary=")[1].encode()
    check_upload(request.body, boundary)


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([], "is missing"),
        ([(IMAGE_FIELD, None, b"http://example.com/a.jpg")], "must be a file part"),
        ([(IMAGE_FIELD, "a", b"1"), (IMAGE_FIELD, "b", b"2")], "2 parts named"),
        ([(IMAGE_FIELD, "a", b"1"), ("note", None, b"2")], "unexpected part 'note'"),
    ],
)
def test_upload_check_refuses(parts, message):
    request = multipart(parts)
    boundary = request.headers["Content-Type"].split("boundary=")[1].encode()
    with pytest.raises(RequestError, match=message) as caught:
        check_upload(request.body, boundary)
    assert caught.value.status == 400


def test_upload_check_refuses_a_body_cut_short():
    request = multipart([(IMAGE_FIELD, "photo.jpg", b"\xff\xd8\xff data")])
    boundary = request.headers["Content-Type"].split("boundary=")[1].encode()
    with pytest.raises(RequestError, match="closing boundary"):
        check_upload(request.body[:-10], boundary)


def test_unknown_error_bodies_become_the_status_phrase():
    assert contract_error(404, b"Not Found") == "Not Found"
    assert contract_error(405, b"") == "Method Not Allowed"
    assert contract_error(500, b'{"error": "a stack trace"}') == "internal error, see the server log"


# --- the bentos over real HTTP --------------------------------------------------------------


def _photo() -> Path:
    return photo_paths()["rocket"]


@pytest.fixture(scope="module", params=sorted(BENTOS))
def served(request) -> Iterator[str]:
    with service_process(BENTOS[request.param], free_port(), workers=1) as running:
        yield running.base_url


def test_client_calls_every_endpoint_by_name(served):
    photo = _photo()
    with bentoml.SyncHTTPClient(served) as client:
        answers = [
            client.predict(image=base64.b64encode(photo.read_bytes()).decode()),
            client.predict_upload(image=photo),
            client.predict_raw(photo),
        ]
    assert all(answer == answers[0] for answer in answers), answers
    assert set(answers[0]) == {"prediction", "probability", "probabilities"}


def test_async_client_and_errors_through_the_client(served):
    # Only JSON here: BentoML 1.4.39's AsyncHTTPClient sends files with a sync httpx call
    # and fails ("Attempted to send an sync request with an AsyncClient instance").
    encoded = base64.b64encode(_photo().read_bytes()).decode()

    async def ask() -> tuple[dict, Exception]:
        async with bentoml.AsyncHTTPClient(served) as client:
            answer = await client.predict(image=encoded)
            try:
                await client.predict(image="not base64!")
            except Exception as exc:  # what a client user sees for a 400
                return answer, exc
            raise AssertionError("bad base64 was accepted")

    answer, error = asyncio.run(ask())
    assert answer["prediction"]
    assert getattr(error, "error_code", None) == 400
    assert "not valid standard base64" in str(error)


def test_docs_json_documents_every_endpoint(served):
    spec = httpx.get(f"{served}/docs.json", timeout=30).json()
    expected = {PREDICT_ROUTE: "application/json", UPLOAD_ROUTE: "multipart/form-data", RAW_ROUTE: "image/*"}
    for route, content_type in expected.items():
        operation = spec["paths"][route]["post"]
        assert content_type in operation["requestBody"]["content"], (route, operation["requestBody"])
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        schema = _resolve(spec, ok)
        assert set(schema["properties"]) == {"prediction", "probability", "probabilities"}, schema
        bad = _resolve(spec, operation["responses"]["400"]["content"]["application/json"]["schema"])
        assert bad["required"] == ["error"], bad
        assert bad["properties"]["error"]["type"] == "string", bad


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


@pytest.fixture(scope="module", params=sorted(BENTOS))
def batching(request) -> Iterator[str]:
    env = {"MAX_BATCH_SIZE": "4"}
    with service_process(BENTOS[request.param], free_port(), workers=1, env=env) as running:
        yield running.base_url


def test_batching_answers_each_request_alone(batching):
    photo = _photo().read_bytes()
    requests = [(endpoint, photo) for endpoint in ENDPOINTS.values()] * 4
    requests += [(endpoint, b"\xff\xd8\xff not really") for endpoint in ENDPOINTS.values()] * 2

    def send(item):
        endpoint, image = item
        request = endpoint.request(image)
        return httpx.post(batching + endpoint.route, content=request.body, headers=dict(request.headers), timeout=60)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        responses = list(pool.map(send, requests))
    good = [
        json.dumps(r.json(), sort_keys=True)
        for (_, image), r in zip(requests, responses, strict=True)
        if image == photo
    ]
    bad = [r for (_, image), r in zip(requests, responses, strict=True) if image != photo]
    assert all(r.status_code == 400 and "error" in r.json() for r in bad), [r.text for r in bad]
    assert len(set(good)) == 1, good  # every good image got the same full answer
    metrics = httpx.get(f"{batching}/metrics", timeout=30).text
    assert "bentoml_service_adaptive_batch_size_count" in metrics  # the batchable model service ran them
