#!/usr/bin/env python3
"""Answers schemathesis does not provoke, checked against the spec all the same.

Generated requests never carry a 64 KiB body, an 8 KiB target or a hundred headers, never
hit a route that is not in the spec, and (with the public limits raised) are never
throttled or shed. This sends exactly those requests and checks each answer: its status
is documented for the operation, its body matches the documented schema, and the headers
the spec requires (`Retry-After`, `Allow`) are there and well-formed.

Usage:
  edges.py heads  PUBLIC_VIEW ADMIN_VIEW SPEC PUBLIC_URL ADMIN_URL
      413 (with `Connection: close`), 414, 431, 401, 404 for a path that is no route,
      405 with `Allow`; activating a batch whose upload was refused (404), and one whose
      upload is still running (409).
  edges.py limits PUBLIC_VIEW SPEC PUBLIC_URL
      against a gateway with `limits.max_in_flight = 1` and the default public limits:
      503 when load is shed, 429 `ERR_LOCKED_OUT` and 429 `ERR_RATE_LIMITED`.
  edges.py draining ADMIN_VIEW SPEC ADMIN_URL
      after the gateway got SIGTERM: `/readyz` 503 (draining), `/healthz` still 200.
Tokens come from KAMIGATE_MERCHANT_TOKEN and KAMIGATE_ADMIN_TOKEN.
"""

import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

import jsonschema_rs
import requests
import schemathesis
import yaml

FAILURES = []


def check(what, ok, detail=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail and not ok else ''}")
    if not ok:
        FAILURES.append(what)


class Spec:
    def __init__(self, view_path, spec_path):
        self.schema = schemathesis.openapi.from_path(view_path)
        with open(spec_path, encoding="utf-8") as f:
            self.raw = yaml.safe_load(f)

    def conforms(self, what, path, method, response, status, code):
        """The answer is `status` with error `code`, documented for the operation."""
        operation = self.schema[path][method]
        check(f"{what}: status {status}", response.status_code == status, f"got {response.status_code}: {response.text[:200]}")
        definition = operation.responses.find_by_status_code(response.status_code)
        check(f"{what}: {response.status_code} is documented for {method} {path}", definition is not None)
        if definition is not None:
            try:
                operation.validate_response(response)
                check(f"{what}: body matches the schema", True)
            except Exception as e:  # schemathesis raises a group of failures
                check(f"{what}: body matches the schema", False, str(e)[:400])
        if code is not None:
            self.error_code(what, response, code)
        if definition is not None:
            for name, header in (definition.definition.get("headers") or {}).items():
                header = self.resolve(header)
                if header.get("required"):
                    self.header(what, response, name, header)

    def component(self, what, response, status, code, name):
        """An answer no operation has (a path that is no route, another method): it must
        match the response component `name`."""
        check(f"{what}: status {status}", response.status_code == status, f"got {response.status_code}")
        component = self.raw["components"]["responses"][name]
        schema = component["content"]["application/json"]["schema"]
        validator = jsonschema_rs.Draft202012Validator(
            {**schema, "components": self.raw["components"]}
        )
        try:
            body = response.json()
            errors = [e.message for e in validator.iter_errors(body)]
        except ValueError:
            errors = ["not JSON"]
        check(f"{what}: body matches components/responses/{name}", not errors, "; ".join(errors)[:400])
        self.error_code(what, response, code)
        for header_name, header in (component.get("headers") or {}).items():
            self.header(what, response, header_name, self.resolve(header))

    def error_code(self, what, response, code):
        try:
            got = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            got = None
        check(f"{what}: {code}", got == code, f"got {got}")

    def header(self, what, response, name, header):
        value = response.headers.get(name)
        check(f"{what}: {name} header", value is not None)
        if value is not None and header.get("schema", {}).get("type") == "integer":
            ok = value.isdigit() and int(value) >= header["schema"].get("minimum", 0)
            check(f"{what}: {name} is an integer ≥ {header['schema'].get('minimum', 0)}", ok, value)

    def resolve(self, node):
        while isinstance(node, dict) and "$ref" in node:
            target = self.raw
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            node = target
        return node


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def heads(public_view, admin_view, spec_path, public, admin):
    merchant = bearer(os.environ["KAMIGATE_MERCHANT_TOKEN"])
    admin_auth = bearer(os.environ["KAMIGATE_ADMIN_TOKEN"])
    pub = Spec(public_view, spec_path)
    adm = Spec(admin_view, spec_path)

    print("public listener")
    big = {"code": "A" * 70_000, "redeemer": "edge-1"}
    pub.conforms("body over max_body_bytes", "/v1/redeem", "POST",
                 requests.post(f"{public}/v1/redeem", json=big, timeout=30), 413, "ERR_PAYLOAD_TOO_LARGE")
    pub.conforms("target over max_uri_bytes", "/v1/skus/{sku}/claims/{order_id}", "GET",
                 requests.get(f"{public}/v1/skus/gift-50/claims/o-1?pad={'x' * 9000}", headers=merchant, timeout=30),
                 414, "ERR_URI_TOO_LONG")
    many = {**merchant, **{f"x-pad-{i}": "1" for i in range(101)}}
    pub.conforms("more than max_headers headers", "/v1/skus/{sku}", "GET",
                 requests.get(f"{public}/v1/skus/gift-50", headers=many, timeout=30), 431, "ERR_HEADERS_TOO_LARGE")
    pub.conforms("claim without a token", "/v1/skus/{sku}/claims", "POST",
                 requests.post(f"{public}/v1/skus/gift-50/claims", json={"order_id": "edge-1"}, timeout=30),
                 401, "ERR_UNAUTHORIZED")
    pub.conforms("claim with the admin token", "/v1/skus/{sku}/claims", "POST",
                 requests.post(f"{public}/v1/skus/gift-50/claims", json={"order_id": "edge-1"},
                               headers=admin_auth, timeout=30), 401, "ERR_UNAUTHORIZED")
    pub.conforms("claim of an unknown SKU", "/v1/skus/{sku}/claims", "POST",
                 requests.post(f"{public}/v1/skus/no-such-sku/claims", json={"order_id": "edge-1"},
                               headers=merchant, timeout=30), 404, "ERR_NOT_FOUND")
    pub.component("a path that is no route", requests.get(f"{public}/v1/nowhere", timeout=30),
                  404, "ERR_NOT_FOUND", "NotFound")
    pub.component("PUT of the public SKU view", requests.put(f"{public}/v1/skus/gift-50", headers=merchant, timeout=30),
                  405, "ERR_METHOD_NOT_ALLOWED", "MethodNotAllowed")
    response = requests.put(f"{public}/v1/skus/gift-50", headers=merchant, timeout=30)
    check("Allow on the public listener lists GET only", response.headers.get("Allow") == "GET",
          response.headers.get("Allow", "none"))

    print("admin listener")
    upload = "\n".join(f"EDGECODE{i:06d}" for i in range(200)).encode()
    adm.conforms("import with an unsupported content type", "/v1/skus/{sku}/batches", "POST",
                 requests.post(f"{admin}/v1/skus/gift-50/batches?batch_id=edge-json", data=upload,
                               headers={**admin_auth, "Content-Type": "application/json"}, timeout=30),
                 400, "ERR_BAD_REQUEST")
    adm.conforms("PUT SKU over max_body_bytes", "/v1/skus/{sku}", "PUT",
                 requests.put(f"{admin}/v1/skus/edge-sku", json={"blacklist": ["A" * 1000] * 70},
                              headers=admin_auth, timeout=30), 413, "ERR_PAYLOAD_TOO_LARGE")
    adm.conforms("void without a token", "/v1/keys/{key_id}/void", "POST",
                 requests.post(f"{admin}/v1/keys/gift-50.1/void", json={"reason": "edge"}, timeout=30),
                 401, "ERR_UNAUTHORIZED")
    adm.conforms("admin SKU view with the merchant token", "/v1/skus/{sku}", "GET",
                 requests.get(f"{admin}/v1/skus/gift-50", headers=merchant, timeout=30), 401, "ERR_UNAUTHORIZED")
    adm.conforms("target over max_uri_bytes", "/metrics", "GET",
                 requests.get(f"{admin}/metrics?pad={'x' * 9000}", timeout=30), 414, "ERR_URI_TOO_LONG")
    response = requests.delete(f"{admin}/v1/skus/gift-50", headers=admin_auth, timeout=30)
    adm.component("DELETE of a SKU", response, 405, "ERR_METHOD_NOT_ALLOWED", "MethodNotAllowed")
    check("Allow on the admin listener lists GET, PUT", response.headers.get("Allow") == "GET, PUT",
          response.headers.get("Allow", "none"))
    adm.component("a path that is no route", requests.get(f"{admin}/v1/redeem", timeout=30),
                  404, "ERR_NOT_FOUND", "NotFound")

    # A refused upload "leaves its batch_id unused": activating it finds no batch.
    refused = requests.post(f"{admin}/v1/skus/gift-50/batches?batch_id=edge-refused",
                            data=b"expires_at\nEDGECODE999999\n",
                            headers={**admin_auth, "Content-Type": "text/csv"}, timeout=30)
    adm.conforms("upload of a CSV without a code column", "/v1/skus/{sku}/batches", "POST",
                 refused, 400, "ERR_BAD_REQUEST")
    adm.conforms("activation of the refused batch", "/v1/skus/{sku}/batches/{batch_id}/activate", "POST",
                 requests.post(f"{admin}/v1/skus/gift-50/batches/edge-refused/activate",
                               headers=admin_auth, timeout=30), 404, "ERR_NOT_FOUND")
    activate_during_upload(adm, admin, admin_auth)


def activate_during_upload(adm, admin, admin_auth):
    """An activation that comes while the batch's upload is still running is refused
    (`409 ERR_BATCH_IN_PROGRESS`), and the upload finishes as if it had not been asked."""
    # A SKU of its own, in the default format: schemathesis has changed gift-50's at will.
    created = requests.put(f"{admin}/v1/skus/edge-race", json={}, headers=admin_auth, timeout=30)
    check("a SKU for the race: created", created.status_code in (200, 201), created.text[:200])
    go_on = threading.Event()
    answers = {}

    def rows():
        yield b"EDGERUN000001\n"
        go_on.wait(30)
        yield b"EDGERUN000002\n"

    def upload():
        answers["upload"] = requests.post(
            f"{admin}/v1/skus/edge-race/batches?batch_id=edge-running", data=rows(),
            headers={**admin_auth, "Content-Type": "text/plain"}, timeout=60)

    uploader = threading.Thread(target=upload)
    uploader.start()
    # Until the upload has begun, the batch does not exist (404).
    deadline = time.monotonic() + 20
    while True:
        response = requests.post(f"{admin}/v1/skus/edge-race/batches/edge-running/activate",
                                 headers=admin_auth, timeout=30)
        if response.status_code != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    go_on.set()
    uploader.join(60)
    check("activation while its upload runs: answered (the upload had begun)", response.status_code != 404)
    adm.conforms("activation while its upload runs", "/v1/skus/{sku}/batches/{batch_id}/activate", "POST",
                 response, 409, "ERR_BATCH_IN_PROGRESS")
    upload_answer = answers.get("upload")
    check("the upload it raced: answered", upload_answer is not None)
    if upload_answer is not None:
        adm.conforms("the upload it raced", "/v1/skus/{sku}/batches", "POST", upload_answer, 200, None)
        report = upload_answer.json() if upload_answer.status_code == 200 else {}
        check("the upload it raced: both rows imported, active",
              (report.get("accepted"), report.get("state")) == (2, "active"), str(report)[:200])


def hold_a_slot(public):
    """Starts a redemption whose body never finishes arriving: it holds the only in-flight
    slot until the connection is closed."""
    url = urllib.parse.urlparse(public)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/v1/redeem")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "100")
    conn.endheaders()
    conn.send(b'{"code": "')
    return conn


def in_flight(admin):
    """The gateway's admitted requests (kamigate_in_flight_requests), from /metrics."""
    token = os.environ["KAMIGATE_ADMIN_TOKEN"]
    text = requests.get(f"{admin}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    for line in text.splitlines():
        if line.startswith("kamigate_in_flight_requests "):
            return float(line.split()[1])
    return 0.0


def limits(public_view, spec_path, public, admin):
    pub = Spec(public_view, spec_path)
    print("public listener, max_in_flight = 1, default limits")
    # Shed: the held request is admitted before its body is read, so the next one finds no
    # slot. Wait until the gateway counts it in flight, then send exactly one more: probing
    # with redemptions instead would spend the failed-redemption allowance on a busy machine.
    held = hold_a_slot(public)
    deadline = time.monotonic() + 30
    while in_flight(admin) < 1:
        if time.monotonic() > deadline:
            raise SystemExit("the held request was never admitted")
        time.sleep(0.05)
    response = requests.post(f"{public}/v1/redeem", json={"code": "X", "redeemer": "edge-2"}, timeout=30)
    pub.conforms("load shed", "/v1/redeem", "POST", response, 503, "ERR_UNAVAILABLE")
    held.close()

    # Failed redemptions: the 11th within the window locks the redeemer out.
    deadline = time.monotonic() + 30
    response = None
    for _ in range(11):
        while time.monotonic() < deadline:
            response = requests.post(f"{public}/v1/redeem", json={"code": "!!", "redeemer": "edge-locked"}, timeout=30)
            if response.status_code != 503:  # the held connection's slot may take a moment to free
                break
    pub.conforms("11th failed redemption", "/v1/redeem", "POST", response, 429, "ERR_LOCKED_OUT")

    # The public bucket: burst 100 at 50/s. A request loop outruns it long before 1000.
    session = requests.Session()
    for _ in range(1000):
        response = session.post(f"{public}/v1/redeem", json={"code": "!!", "redeemer": "edge-fast"}, timeout=30)
        if response.status_code == 429 and response.json()["error"]["code"] == "ERR_RATE_LIMITED":
            break
    pub.conforms("public bucket empty", "/v1/redeem", "POST", response, 429, "ERR_RATE_LIMITED")


def draining(admin_view, spec_path, admin):
    """After SIGTERM, for `shutdown_delay_ms`, readiness is 503 while serving goes on."""
    # Asked first, the spec loaded after: the window is `shutdown_delay_ms` long.
    deadline = time.monotonic() + 10
    while True:
        response = requests.get(f"{admin}/readyz", timeout=30)
        if response.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    alive = requests.get(f"{admin}/healthz", timeout=30)
    adm = Spec(admin_view, spec_path)
    print("admin listener, after SIGTERM")
    adm.conforms("readiness while draining", "/readyz", "GET", response, 503, None)
    check("readiness while draining: status draining", response.json().get("status") == "draining",
          response.text[:200])
    adm.conforms("liveness while draining", "/healthz", "GET", alive, 200, None)


def main():
    mode = sys.argv[1]
    if mode == "heads":
        heads(*sys.argv[2:7])
    elif mode == "limits":
        limits(*sys.argv[2:6])
    elif mode == "draining":
        draining(*sys.argv[2:5])
    else:
        raise SystemExit(f"edges: unknown mode {mode}")
    if FAILURES:
        print(f"edges: {len(FAILURES)} failed")
        sys.exit(1)
    print("edges: all answers conform")


if __name__ == "__main__":
    main()
