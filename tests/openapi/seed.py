#!/usr/bin/env python3
"""Gives a fresh gateway something to answer about, then writes the schemathesis config
that points the generated requests at it.

Without state every stateful route answers 404: an order, a key or a batch that exists is
what makes claims replay or conflict, confirms reveal codes, redemptions succeed or find a
used card, and audits list events. So this creates SKUs (one with two format versions, one
with a per-user limit, one with nothing to sell), imports codes in all three upload
formats (one batch left pending), claims, holds, confirms, releases, redeems, voids and
restores, and records every name it made. The config binds those names to the
parameters that take them (`sku`, `order_id`, `key_id`, `batch_id`, `code`, …) part of
the time, so schemathesis sends both real and generated values.

Usage: seed.py PUBLIC_URL ADMIN_URL OUT_DIR   (tokens from KAMIGATE_MERCHANT_TOKEN and
KAMIGATE_ADMIN_TOKEN). Writes OUT_DIR/seed.toml: `[dictionaries]` and `[parameters]`.
"""

import json
import os
import random
import sys
import time
import urllib.error
import urllib.request

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class Gateway:
    def __init__(self, public, admin):
        self.public = public
        self.admin = admin
        self.merchant_token = os.environ["KAMIGATE_MERCHANT_TOKEN"]
        self.admin_token = os.environ["KAMIGATE_ADMIN_TOKEN"]

    def call(self, base, token, method, path, body=None, content_type="application/json"):
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def merchant(self, method, path, body=None, expect=(200,)):
        return self._checked(self.public, self.merchant_token, method, path, body, expect)

    def admin_call(self, method, path, body=None, expect=(200, 201), content_type="application/json"):
        return self._checked(self.admin, self.admin_token, method, path, body, expect, content_type)

    def _checked(self, base, token, method, path, body, expect, content_type="application/json"):
        status, answer = self.call(base, token, method, path, body, content_type)
        if status not in expect:
            raise SystemExit(f"seed: {method} {path} answered {status}: {answer}")
        return answer


def codes(prefix, n):
    return [f"{prefix}{i:06d}" for i in range(n)]


def crockford_codes(rng, n):
    return ["".join(rng.choice(CROCKFORD) for _ in range(16)) for _ in range(n)]


def main():
    public, admin, out = sys.argv[1], sys.argv[2], sys.argv[3]
    gw = Gateway(public, admin)
    rng = random.Random(20261202)
    skus, orders, batches, key_ids = [], [], [], []
    sold, unsold, redeemers = [], [], ["holder-1", "holder-2", "holder-3"]

    def put_sku(sku, settings):
        gw.admin_call("PUT", f"/v1/skus/{sku}", settings)
        skus.append(sku)

    def upload(sku, batch_id, body, content_type, activate=True):
        query = f"batch_id={batch_id}" + ("" if activate else "&activate=false")
        report = gw.admin_call(
            "POST", f"/v1/skus/{sku}/batches?{query}", body.encode(), content_type=content_type
        )
        batches.append(batch_id)
        return report

    def claim(sku, order_id, **fields):
        order = gw.merchant("POST", f"/v1/skus/{sku}/claims", {"order_id": order_id, **fields})
        orders.append(order_id)
        for key in order["keys"]:
            key_ids.append(key["key_id"])
            if "code" in key:
                sold.append(key["code"])
        return order

    # The names the spec's examples use (as the README's walk-through does): schemathesis
    # starts every operation from its examples, so they hit state. Key `gift-50.1` is the
    # example code, sold to order `o-1`; the format then changes, so version 1 is an
    # earlier version with sold keys (retiring it is `409` unless forced). Most orders are
    # here, so the order routes find them: finals, holds, a confirmed and a released one,
    # one that lapsed at once, a batch.
    put_sku("gift-50", {})
    upload("gift-50", "b-1", "7K3M-9QXP-2D4R-HT6W\n", "text/plain")
    claim("gift-50", "o-1", user_id="u-9")
    put_sku(
        "gift-50",
        {"format": {"preset": "crockford32", "min_length": 16, "max_length": 16, "group_size": 4}},
    )
    skus.pop()
    upload("gift-50", "b-3", "\n".join(crockford_codes(rng, 300)) + "\n", "text/plain")
    for i in range(4):
        claim("gift-50", f"o-final-{i}", user_id=f"u-{i}")
    claim("gift-50", "o-pair", quantity=2)
    for i in range(8):
        claim("gift-50", f"o-hold-{i}", hold_ms=3_600_000)
    claim("gift-50", "o-hold-default", hold=True)
    claim("gift-50", "o-lapsed", hold_ms=1)
    # An upload refused before any row (a CSV header without `code`): its batch id is
    # left unused, and the batch routes are asked about it.
    gw.admin_call(
        "POST", "/v1/skus/gift-50/batches?batch_id=b-refused", b"expires_at\nX\n",
        expect=(400,), content_type="text/csv",
    )
    batches.append("b-refused")
    confirmed = gw.merchant("POST", "/v1/skus/gift-50/claims/o-hold-0/confirm")
    sold.extend(k["code"] for k in confirmed["keys"])
    gw.merchant("POST", "/v1/skus/gift-50/claims/o-hold-1/release")
    batch = gw.merchant(
        "POST",
        "/v1/skus/gift-50/claims/batch",
        {"claims": [{"order_id": "o-batch-0"}, {"order_id": "o-batch-1", "hold": True}]},
    )
    for answer in batch["claims"]:
        orders.append(answer["order_id"])
        key_ids.extend(k["key_id"] for k in answer["keys"])
        sold.extend(k["code"] for k in answer["keys"] if "code" in k)

    # A SKU with stock for every route: lines, CSV (one row already expired) and NDJSON;
    # some of its sold codes redeemed, one key voided, one voided and restored.
    put_sku("kit-gift", {})
    gift = codes("KITGIFT", 400)
    upload("kit-gift", "kit-lines", "\n".join(gift[:300]) + "\n", "text/plain")
    csv = "code,expires_at,max_uses\n" + "".join(f"{c},2099-01-01T00:00:00Z,2\n" for c in gift[300:350])
    csv += "KITEXPIRED000001,2001-01-01T00:00:00Z,1\n"
    report = upload("kit-gift", "kit-csv", csv, "text/csv")
    assert report["rejected"] == 1, report
    ndjson = "".join(json.dumps({"code": c}) + "\n" for c in gift[350:])
    upload("kit-gift", "kit-pending", ndjson, "application/x-ndjson", activate=False)
    unsold.extend(gift[280:300])
    gift_sold = [claim("kit-gift", f"kit-final-{i}")["keys"][0]["code"] for i in range(10)]
    for i, code in enumerate(gift_sold[:6]):
        redeemed = gw.call(
            public, None, "POST", "/v1/redeem",
            {"code": code, "redeemer": redeemers[i % 3], "sku": "kit-gift"},
        )
        assert redeemed[0] == 200, redeemed
    voided, restored = f"kit-gift.{gift.index(unsold[0]) + 1}", key_ids[-1]
    gw.admin_call("POST", f"/v1/keys/{voided}/void", {"reason": "seed: void"})
    gw.admin_call("POST", f"/v1/keys/{restored}/void", {"reason": "seed: void"})
    gw.admin_call("POST", f"/v1/keys/{restored}/restore", {"reason": "seed: restore"})
    key_ids.append(voided)

    # A sold code that expires seconds from now: redeemed later in the run, it is `410`.
    put_sku("kit-expiring", {})
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3))
    upload("kit-expiring", "kit-soon", f"code,expires_at\nKITSOON000001,{soon}\n", "text/csv")
    claim("kit-expiring", "kit-expiring-order")

    # A SKU with a per-user limit (claims need `user_id`), and one with nothing to sell.
    put_sku("kit-limited", {"per_user_limit": 1, "allow_late_confirm": False})
    upload("kit-limited", "kit-limited-1", "\n".join(codes("KITLIM", 30)) + "\n", "text/plain")
    claim("kit-limited", "kit-limited-order", user_id="buyer-1")
    put_sku("kit-empty", {"max_issues": 2, "max_uses": 2})

    write_config(out, skus, orders, batches, key_ids, sold, unsold, redeemers)
    print(
        f"seed: {len(skus)} SKUs, {len(batches)} batches, {len(orders)} orders, "
        f"{len(key_ids)} keys, {len(sold)} sold codes"
    )


def toml_list(values):
    # Identifiers and codes are plain ASCII: JSON's string syntax is TOML's.
    return json.dumps(sorted(set(values)))


def write_config(out, skus, orders, batches, key_ids, sold, unsold, redeemers):
    """Writes OUT_DIR/seed.toml: the names made, and which parameters take them."""
    dictionaries = {
        "skus": toml_list(skus),
        "orders": toml_list(orders),
        "batches": toml_list(batches),
        "keys": toml_list(key_ids),
        "codes": toml_list(sold + unsold),
        "redeemers": toml_list(redeemers),
        "versions": "[1, 2]",
        "order-skus": toml_list(["gift-50"]),
    }
    # Real values part of the time; generated ones (unknown, malformed, hostile) otherwise.
    bindings = {
        "path.sku": ("skus", 0.8),
        "body.sku": ("skus", 0.6),
        "path.order_id": ("orders", 0.7),
        "body.order_id": ("orders", 0.3),
        "path.batch_id": ("batches", 0.7),
        "query.batch_id": ("batches", 0.3),
        "path.key_id": ("keys", 0.8),
        "path.version": ("versions", 0.7),
        "body.code": ("codes", 0.7),
        "body.redeemer": ("redeemers", 0.5),
    }
    lines = ["[dictionaries]"]
    lines += [f"{name} = {{ values = {values} }}" for name, values in dictionaries.items()]
    lines += ["", "[parameters]"]
    lines += [
        f'"{key}" = {{ dictionary = "{name}", probability = {p} }}'
        for key, (name, p) in bindings.items()
    ]
    # The order routes name a SKU and an order: most orders are in `gift-50`.
    lines += [
        "",
        "[[operations]]",
        'include-operation-id = ["getOrder", "confirmOrder", "releaseOrder"]',
        'parameters = { "path.sku" = { dictionary = "order-skus", probability = 0.9 } }',
    ]
    with open(os.path.join(out, "seed.toml"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
