// What a scenario's setup() does before any load: its own SKU with a unique name, its own
// codes, and, where a scenario starts from sold codes, claims of all of them.

import http from 'k6/http';
import {
  body, claimBatch, describe, errorCode, importBatch, order, orderRequests, putSku, withRetry,
} from './api.js';

/** Most codes sent in one import upload. */
const IMPORT_CHUNK = 50000;
/** Claims sent in one batch claim (the gateway takes up to 500). */
const CLAIMS_PER_BATCH = 200;

/** Creates `sku` with `settings`; throws unless the gateway created it just now. */
export function createSku(sku, settings = {}) {
  const res = putSku(sku, settings);
  if (res.status !== 201) {
    throw new Error(`PUT /v1/skus/${sku}: expected 201 (a new SKU), got ${describe(res)}: ${res.body}`);
  }
  return body(res);
}

/**
 * Imports `codes` into `sku` in batches `<batchPrefix>-<n>`; throws unless every code was
 * accepted (none rejected, none duplicate). Returns how many were imported.
 */
export function importCodes(sku, codes, batchPrefix = 'load') {
  for (let start = 0, n = 1; start < codes.length; start += IMPORT_CHUNK, n++) {
    const chunk = codes.slice(start, start + IMPORT_CHUNK);
    const res = importBatch(sku, `${batchPrefix}-${n}`, chunk);
    const report = body(res);
    if (res.status !== 200 || !report || report.accepted !== chunk.length ||
        report.rejected !== 0 || report.duplicate !== 0) {
      throw new Error(`import into ${sku}: expected ${chunk.length} accepted, got ${describe(res)}: ` +
        `${String(res.body).slice(0, 500)}`);
    }
  }
  return codes.length;
}

/**
 * Claims `count` codes of `sku` as final claims of `perOrder` codes each (orders
 * `<orderPrefix>-<n>`), through batch claims; a claim answered 503 is retried alone. Throws
 * unless every claim succeeded. Returns the codes in claim order.
 */
export function claimCodes(sku, count, orderPrefix, perOrder = 10) {
  const claims = [];
  for (let left = count, n = 0; left > 0; left -= perOrder, n++) {
    claims.push({ order_id: `${orderPrefix}-${n}`, quantity: Math.min(perOrder, left) });
  }
  const codes = [];
  for (let start = 0; start < claims.length; start += CLAIMS_PER_BATCH) {
    const slice = claims.slice(start, start + CLAIMS_PER_BATCH);
    const res = withRetry(() => claimBatch(sku, slice), 120000);
    const answers = res.status === 200 ? body(res).claims : null;
    if (!answers || answers.length !== slice.length) {
      throw new Error(`batch claim on ${sku}: ${describe(res)}: ${String(res.body).slice(0, 500)}`);
    }
    answers.forEach((answer, i) => {
      let got = answer;
      if (got.error) {
        // Answered on its own: retrying the same order replays or finishes it.
        const again = withRetry(() => order(sku, slice[i].order_id), 60000);
        const retried = again.status === 200 ? body(again) : null;
        if (!retried || retried.state !== 'claimed') {
          throw new Error(`claim ${slice[i].order_id}: ${got.error.code}, then ${describe(again)}`);
        }
        got = retried;
      }
      if (got.state !== 'claimed' || got.keys.length !== slice[i].quantity) {
        throw new Error(`claim ${slice[i].order_id}: expected ${slice[i].quantity} claimed codes, ` +
          `got ${JSON.stringify(got).slice(0, 300)}`);
      }
      got.keys.forEach((k) => codes.push(k.code));
    });
  }
  return codes;
}

/**
 * Reads orders back (`GET /v1/skus/{sku}/claims/{order_id}`), 100 at a time. Returns a map
 * from order id to the order, or to null when the gateway does not know the order (404);
 * an order that cannot be read otherwise is an `{error}` entry.
 */
export function readOrders(sku, orderIds) {
  const found = {};
  for (let start = 0; start < orderIds.length; start += 100) {
    const ids = orderIds.slice(start, start + 100);
    const answers = http.batch(orderRequests(sku, ids));
    answers.forEach((res, i) => {
      const id = ids[i];
      let r = res;
      if (r.status === 503 || r.status === 0 || r.status === 429) {
        r = withRetry(() => order(sku, id), 60000);
      }
      if (r.status === 200) found[id] = body(r);
      else if (r.status === 404 && errorCode(r) === 'ERR_NOT_FOUND') found[id] = null;
      else found[id] = { error: describe(r) };
    });
  }
  return found;
}
