"""The web console's page and ``/console/api`` without a browser (fast; no model is loaded).

The front serves fixed addresses here (``AddressSource``): an in-process ``llama-cpp``
backend on the embedded transport, whose model-operation rpcs need no loaded model. The
supervisor side (start/stop, states) is proven in the real browser (test_console_browser).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from inferd.http.console.jobs import breakdown_jobs

KEY = "sk-console"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def http() -> Iterator[Any]:
    pytest.importorskip("fastapi")  # in the fixture: under CI=true a skip fails (tests/conftest.py)
    pytest.importorskip("llama_cpp")
    from fastapi.testclient import TestClient

    from inferd.backends.llama_cpp import LlamaCppBackend
    from inferd.client import provide, unprovide
    from inferd.http.app import create_app
    from inferd.http.source import AddressSource
    from inferd.settings import Settings

    backend = LlamaCppBackend(settings=Settings.load([]))
    provide("embedded-console-test", backend)
    app = create_app(AddressSource({"ops": "embedded-console-test"}, {"ops": "llama-cpp"}), api_keys=[KEY])
    try:
        with TestClient(app) as client:
            yield client
    finally:
        unprovide("embedded-console-test")
        backend.jobs.shutdown()


def error(r: Any) -> dict[str, Any]:
    return r.json()["error"]


def test_page_and_static_files_need_no_key_and_nothing_else_is_served(http: Any) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/console/app.js">' in page.text and "https://" not in page.text  # no CDN
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = http.get(f"/console/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and "http" not in r.text
    for path in ("/console/..%2Fapp.py", "/console/index.htm", "/console/jobs.py"):
        assert http.get(path).status_code == 404


def test_api_needs_the_key(http: Any) -> None:
    for method, path in (("GET", "/console/api/models"), ("GET", "/console/api/jobs"),
                         ("POST", "/console/api/models/ops/stop"), ("POST", "/console/api/jobs")):
        r = http.request(method, path)
        assert r.status_code == 401, path
        assert error(r)["type"] == "authentication_error"
    r = http.get("/console/api/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"


def test_fixed_addresses_are_listed_but_not_started_or_stopped(http: Any) -> None:
    r = http.get("/console/api/models", headers=AUTH).json()
    assert r == {"managed": False, "models": [{"name": "ops", "backend": "llama-cpp", "state": "external",
                                                "managed": False}]}
    r = http.post("/console/api/models/ops/start", headers=AUTH)
    assert r.status_code == 501 and error(r)["code"] == "not_managed"
    r = http.post("/console/api/models/nope/stop", headers=AUTH)
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"


def test_job_requests_are_checked(http: Any) -> None:
    def start(body: Any) -> Any:
        return http.post("/console/api/jobs", headers=AUTH, json=body)

    r = start({"model": "ops", "kind": "export", "fields": {}})
    assert r.status_code == 400 and error(r)["param"] == "kind"
    r = start({"model": "nope", "kind": "quantize", "fields": {}})
    assert r.status_code == 404 and error(r)["code"] == "model_not_found"
    r = start({"model": "ops", "kind": "quantize", "fields": {"no_such_field": 1}})
    assert r.status_code == 400 and error(r)["param"] == "fields" and "no_such_field" in error(r)["message"]
    r = start({"model": "ops", "kind": "quantize", "fields": {"model": ["a"]}})
    assert r.status_code == 400 and error(r)["param"] == "fields"
    # the backend's own refusal, with its status mapped as for every other route
    r = start({"model": "ops", "kind": "quantize", "fields": {"model": "/nope.gguf", "quantization_type": "q8_0"}})
    assert r.status_code in (400, 404) and "/nope.gguf" in error(r)["message"]
    r = start({"model": "ops", "kind": "quantize", "fields": {"model": "/nope.gguf", "quantization_type": "q3_z"}})
    assert r.status_code == 400
    r = http.post("/console/api/jobs/nope/stop", headers=AUTH)
    assert r.status_code == 404 and error(r)["param"] == "job_id"
    assert http.get("/console/api/jobs", headers=AUTH).json() == {"jobs": []}


def test_a_quantization_started_from_the_api_is_followed_to_its_end(http: Any, tmp_path: Any) -> None:
    import time

    from inferd.engines.llama import default_model_path

    r = http.post("/console/api/jobs", headers=AUTH, json={
        "model": "ops", "kind": "quantize",
        "fields": {"model": default_model_path(), "quantization_type": "q8_0", "output_dir": str(tmp_path),
                   "job_id": "api-q8", "extra_options": {"threads": "1"}}})
    assert r.status_code == 201, r.text
    assert r.json()["job_id"] == "api-q8" and r.json()["kind"] == "quantize"
    deadline = time.monotonic() + 120
    while True:
        (job,) = http.get("/console/api/jobs", headers=AUTH).json()["jobs"]
        if job["status"] in ("completed", "failed", "stopped") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["status"] == "completed", job
    assert job["progress_percent"] == 100 and job["output_file"].endswith(".gguf")
    r = http.post("/console/api/jobs/api-q8/stop", headers=AUTH)
    assert r.status_code == 200 and "already ended" in r.json()["message"]


def test_breakdown_names_running_jobs() -> None:
    got = breakdown_jobs({"rss": 1, "jobs_running": 2, "job_quantize_a_b_rss": 3, "job_finetune_x.1_rss": 4,
                          "job_export_y_rss": 5, "job_quantize__rss": 6})
    assert got == [("quantize", "a_b"), ("finetune", "x.1")]
