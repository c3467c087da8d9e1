"""docs/openapi.json describes the running server: every route, method, status and body form."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests

from tests.helpers import make_tarball, publishers_alive
from tests.pki import TestPKI, ingest_config, running_ingest

SPEC = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())


def check(method: str, path: str, response: requests.Response) -> None:
    """The answer is one the spec declares for this operation, with a matching body."""
    operation = SPEC["paths"][path][method]
    declared = operation["responses"]
    assert str(response.status_code) in declared, (method, path, response.status_code)
    content = declared[str(response.status_code)]["content"]
    assert response.headers["Content-Type"].split(";")[0] in content
    schema = content[response.headers["Content-Type"].split(";")[0]]["schema"]
    if "pattern" in schema:
        assert re.fullmatch(schema["pattern"], response.text, re.DOTALL), (path, response.text)


def test_the_running_server_matches_the_openapi_description(tmp_path):
    assert SPEC["openapi"].startswith("3.")
    assert set(SPEC["paths"]) == {f"/pubapi/{r}" for r in
                                  ("ping", "config", "exists", "update", "status", "publish")}
    pki = TestPKI(tmp_path / "pki")
    config = ingest_config(tmp_path / "site", pki)
    (config.repositories[0].root / "sw" / "demo" / "present").mkdir(parents=True)
    tarball = make_tarball(tmp_path / "t.tar.gz", {"f": b"x"})
    with running_ingest(config) as (bound, _):
        base = f"https://127.0.0.1:{bound.https[1]}"
        kw = {"verify": str(pki.ca_file), "timeout": 30}
        creds = {"cert": pki.cert("proxy"), **kw}
        exercised: set[tuple[str, str, int]] = set()

        def call(method: str, path: str, **args: object) -> None:
            response = requests.request(method.upper(), base + path, **{**creds, **args})
            check(method, path, response)
            exercised.add((method, path, response.status_code))

        call("get", "/pubapi/ping")  # no publisher runs: "Service not running"
        with publishers_alive(config):
            call("get", "/pubapi/ping")
        call("get", "/pubapi/config")
        for route in ("exists", "update", "status"):
            for cid in ("demo/present", "demo/absent", "../bad"):
                call("get", f"/pubapi/{route}", params={"cid": cid})
            call("get", f"/pubapi/{route}")  # no cid: 400
            response = requests.get(f"{base}/pubapi/{route}", params={"cid": "a"}, **kw)
            check("get", f"/pubapi/{route}", response)  # no credentials: 403
            exercised.add(("get", f"/pubapi/{route}", response.status_code))
        with tarball.open("rb") as body:
            call("post", "/pubapi/publish", params={"cid": "demo/new"}, data=body)
        call("get", "/pubapi/status", params={"cid": "demo/new"})  # QUEUED
        call("post", "/pubapi/publish", params={"cid": "demo/present"}, data=b"ignored")
        call("post", "/pubapi/publish", params={"cid": "demo/big"},
             headers={"Content-Length": str(config.ingest.max_upload_bytes + 1)}, data=b"")
    statuses = {(m, p): {s for mm, pp, s in exercised if (mm, pp) == (m, p)} for m, p, _ in exercised}
    assert statuses[("get", "/pubapi/exists")] == {200, 400, 403}
    assert 413 in statuses[("post", "/pubapi/publish")]
