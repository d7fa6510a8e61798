#!/usr/bin/env python3
"""One listener's view of openapi.yaml: the operations it serves, with its credentials.

openapi.yaml describes both listeners in one document; each operation names the listener
it is served on in `servers` (its own, else its path's, else the document's). A listener
answers every other method of a path with 405 and an `Allow` header listing only its own
methods (`/v1/skus/{sku}` is GET on the public listener, GET and PUT on the admin one),
and `GET /v1/skus/{sku}` takes the merchant token on one and the admin token on the
other. So each listener is checked against its own view: the operations whose servers
include it, `servers` set to it, and each security requirement narrowed to the listener's
scheme. An operation left with no listener, or a listener with no operation, is an error
in the spec. Links to operations of the other listener are dropped.

Usage: view.py SPEC LISTENER OUT   (LISTENER: public or admin; OUT: a JSON file)
"""

import json
import sys

import yaml

# The spec's server URLs name the default listen addresses.
LISTENERS = {
    "public": {"port": "8080", "scheme": "merchantToken"},
    "admin": {"port": "8081", "scheme": "adminToken"},
}
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def port(server):
    return server["url"].rstrip("/").rsplit(":", 1)[-1]


def main():
    spec_path, listener, out = sys.argv[1:4]
    wanted = LISTENERS[listener]
    with open(spec_path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    root_servers = spec.get("servers", [])
    kept_ops = 0
    for path, item in list(spec["paths"].items()):
        path_servers = item.pop("servers", root_servers)
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            servers = op.pop("servers", path_servers)
            ports = {port(s) for s in servers}
            if not ports & {l["port"] for l in LISTENERS.values()}:
                raise SystemExit(f"view: {method.upper()} {path} names no listener in servers")
            if wanted["port"] not in ports:
                del item[method]
                continue
            kept_ops += 1
            security = op.get("security", spec.get("security", []))
            if security:
                narrowed = [req for req in security if set(req) <= {wanted["scheme"]}]
                if not narrowed:
                    raise SystemExit(
                        f"view: {method.upper()} {path} is on the {listener} listener "
                        f"but takes no {wanted['scheme']}"
                    )
                op["security"] = narrowed
        if not any(m in item for m in METHODS):
            del spec["paths"][path]
    if kept_ops == 0:
        raise SystemExit(f"view: no operation is on the {listener} listener")
    # Links to operations of the other listener cannot be followed on this one.
    kept_ids = {
        op.get("operationId")
        for item in spec["paths"].values()
        for method, op in item.items()
        if method in METHODS
    }
    for item in spec["paths"].values():
        for method in METHODS:
            for response in item.get(method, {}).get("responses", {}).values():
                links = response.get("links", {})
                for name in [n for n, link in links.items() if link["operationId"] not in kept_ids]:
                    del links[name]
    spec["servers"] = [s for s in root_servers if port(s) == wanted["port"]]
    with open(out, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    print(f"view: {listener} listener, {kept_ops} operations")


if __name__ == "__main__":
    main()
