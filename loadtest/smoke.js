// smoke — every route of both listeners a few times, and every documented error a client
// can provoke, each answer checked. One virtual user, SMOKE_ITERATIONS passes (default 3);
// the error paths run in the first pass only, so a run costs its client address three
// failed redemptions (the default lockout comes after ten in ten minutes).
//
// Teardown: the SKU's counts come to exactly what the passes did, in the engine and in the
// ledger, with no drift and nothing in flight.

import { group, sleep } from 'k6';
import exec from 'k6/execution';
import * as api from './lib/api.js';
import { verify } from './lib/checks.js';
import { intEnv, randomCrockford, runId, uniqueCodes } from './lib/env.js';
import { createSku, importCodes } from './lib/inventory.js';
import { expectCounts, settle, startInvariants, expect } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const ITERATIONS = intEnv('SMOKE_ITERATIONS', 3);
/** Codes each pass claims: A (1), B1 (1), B2 (2), the confirmed hold (1). */
const CLAIMED_PER_PASS = 5;
/** Codes each pass redeems: A and B1. */
const REDEEMED_PER_PASS = 2;
/** Codes each pass imports as a pending batch and then activates. */
const ADDED_PER_PASS = 2;
const IMPORTED = CLAIMED_PER_PASS * ITERATIONS + 5;

export const options = {
  scenarios: {
    smoke: { executor: 'per-vu-iterations', vus: 1, iterations: ITERATIONS, maxDuration: '2m' },
  },
  thresholds: {
    checks: ['rate==1'],
    invariant_violations: ['count==0'],
    'http_req_duration{name:POST /v1/skus/{sku}/claims}': [`p(99)<${intEnv('P99_MS', 1000)}`],
    'http_req_duration{name:POST /v1/redeem}': [`p(99)<${intEnv('P99_MS', 1000)}`],
  },
  summaryTrendStats: TREND_STATS,
  setupTimeout: '2m',
  teardownTimeout: '3m',
};

export function setup() {
  startInvariants();
  const run = runId();
  const skus = {
    main: `smoke-${run}`,
    soldOut: `smoke-${run}-soldout`,
    perUser: `smoke-${run}-peruser`,
    noLate: `smoke-${run}-nolate`,
    formats: `smoke-${run}-formats`,
  };
  createSku(skus.main, {});
  importCodes(skus.main, uniqueCodes(IMPORTED), `${run}-initial`);
  createSku(skus.soldOut, {});
  importCodes(skus.soldOut, uniqueCodes(1), `${run}-so`);
  createSku(skus.perUser, { per_user_limit: 1 });
  importCodes(skus.perUser, uniqueCodes(2), `${run}-pu`);
  createSku(skus.noLate, { allow_late_confirm: false });
  importCodes(skus.noLate, uniqueCodes(1), `${run}-nl`);
  createSku(skus.formats, {});
  importCodes(skus.formats, uniqueCodes(1), `${run}-fm`);
  return { run, skus };
}

/** Checks `res` has `status` and, for an error, the error `code`. */
function answers(res, status, code, label) {
  return verify(res, `${label}: ${status}${code ? ' ' + code : ''}`, (r) =>
      r.status === status && (!code || api.errorCode(r) === code));
}

function probes() {
  const health = api.probe('/healthz');
  verify(health, 'GET /healthz: 200 ok', (r) => r.status === 200 && api.body(r).status === 'ok');
  const ready = api.probe('/readyz');
  verify(ready, 'GET /readyz: 200', (r) => r.status === 200);
  const metrics = api.probe('/metrics');
  verify(metrics, 'GET /metrics: 200, engine up', (r) => r.status === 200 &&
    /^kamigate_engine_up 1$/m.test(r.body));
}

/** After a pass's traffic, the series it must have moved are exported. */
function metricsAfterTraffic() {
  const metrics = api.probe('/metrics');
  ['kamigate_http_requests_total', 'kamigate_claims_total', 'kamigate_redemptions_total',
    'kamigate_import_rows_total'].forEach((name) => {
    verify(metrics, `GET /metrics after traffic: ${name}`, (r) => r.status === 200 &&
      r.body.includes(`\n${name}{`));
  });
}

function claims(sku, prefix) {
  const a = api.withRetry(() => api.claim(sku, { order_id: `${prefix}-a`, user_id: 'smoke-user' }));
  const order = api.body(a) || {};
  verify(a, 'claim: 200 claimed with one code', (r) => r.status === 200 && order.state === 'claimed' &&
      order.keys.length === 1 && typeof order.keys[0].code === 'string' && order.replayed === false);
  const again = api.withRetry(() => api.claim(sku, { order_id: `${prefix}-a`, user_id: 'smoke-user' }));
  verify(again, 'claim retried: the same code, replayed', (r) => r.status === 200 &&
      api.body(r).replayed === true && api.body(r).keys[0].code === order.keys[0].code);

  const batch = api.withRetry(() => api.claimBatch(sku, [
    { order_id: `${prefix}-b1` },
    { order_id: `${prefix}-b2`, quantity: 2 },
  ]));
  const both = (api.body(batch) || {}).claims || [];
  verify(batch, 'batch claim: one answer per claim, in order', (r) => r.status === 200 && both.length === 2 &&
      both[0].order_id === `${prefix}-b1` && both[0].keys.length === 1 &&
      both[1].order_id === `${prefix}-b2` && both[1].keys.length === 2);

  const read = api.order(sku, `${prefix}-a`);
  verify(read, 'GET order: the claimed code', (r) => r.status === 200 && api.body(r).keys[0].code === order.keys[0].code);

  const hold = api.withRetry(() => api.claim(sku, { order_id: `${prefix}-h`, hold_ms: 60000 }));
  verify(hold, 'hold: held, key listed without its code', (r) => r.status === 200 &&
      api.body(r).state === 'held' && api.body(r).keys.length === 1 &&
      api.body(r).keys[0].code === undefined && api.body(r).hold_expires_at !== null);
  const paid = api.withRetry(() => api.confirm(sku, `${prefix}-h`));
  verify(paid, 'confirm: claimed, code revealed, not late', (r) => r.status === 200 &&
      api.body(r).state === 'claimed' && typeof api.body(r).keys[0].code === 'string' &&
      api.body(r).late === false);
  verify(api.withRetry(() => api.confirm(sku, `${prefix}-h`)), 'confirm retried: replayed', (r) => r.status === 200 && api.body(r).replayed === true);

  const cancelled = api.withRetry(() => api.claim(sku, { order_id: `${prefix}-r`, hold_ms: 60000 }));
  verify(cancelled, 'hold to release: held', (r) => r.status === 200 && api.body(r).state === 'held');
  verify(api.withRetry(() => api.release(sku, `${prefix}-r`)), 'release: released', (r) => r.status === 200 && api.body(r).state === 'released');
  verify(api.withRetry(() => api.release(sku, `${prefix}-r`)), 'release retried: replayed', (r) => r.status === 200 && api.body(r).replayed === true);

  verify(api.skuView(sku), 'GET /v1/skus/{sku} (merchant): counts by state', (r) => r.status === 200 &&
      typeof api.body(r).engine.available === 'number' && typeof api.body(r).drift === 'number');
  verify(api.adminSkuView(sku), 'GET /v1/skus/{sku} (admin): counts by state', (r) => r.status === 200 && api.body(r).sku === sku);
  return { a: order, b1: both[0], b2: both[1] };
}

function redemptions(sku, prefix, sold) {
  const code = sold.a.keys[0].code;
  const first = api.withRetry(() => api.redeem(code, `${prefix}-redeemer`));
  verify(first, 'redeem (global index): redeemed', (r) => r.status === 200 && api.body(r).state === 'redeemed' &&
      api.body(r).key_id === sold.a.keys[0].key_id && api.body(r).replayed === false);
  verify(api.withRetry(() => api.redeem(code, `${prefix}-redeemer`)), 'redeem retried by the same redeemer: replayed', (r) => r.status === 200 && api.body(r).replayed === true);
  verify(api.withRetry(() => api.redeem(sold.b1.keys[0].code.toLowerCase(), `${prefix}-redeemer-b`, sku)), 'redeem with sku, lower case: redeemed', (r) => r.status === 200 && api.body(r).sku === sku);
}

function admin(sku, prefix, sold) {
  const batchId = `${prefix}-extra`;
  const pending = api.importBatch(sku, batchId, uniqueCodes(ADDED_PER_PASS), false);
  verify(pending, 'import activate=false: pending', (r) => r.status === 200 && api.body(r).state === 'pending' &&
      api.body(r).accepted === ADDED_PER_PASS);
  verify(api.importBatch(sku, batchId, uniqueCodes(ADDED_PER_PASS), false), 'import the same batch_id again: replayed, nothing added', (r) => r.status === 200 &&
      api.body(r).replayed === true && api.body(r).accepted === ADDED_PER_PASS);
  verify(api.activateBatch(sku, batchId), 'activate: active', (r) => r.status === 200 && api.body(r).state === 'active' &&
      api.body(r).loaded === ADDED_PER_PASS);
  verify(api.warm(sku), 'warm: 200', (r) => r.status === 200 && typeof api.body(r).present === 'number');

  const keyId = sold.b2.keys[0].key_id;
  verify(api.voidKey(keyId, 'smoke test'), 'void: void', (r) => r.status === 200 && api.body(r).state === 'void' && api.body(r).changed === true);
  verify(api.restoreKey(keyId, 'smoke test'), 'restore: claimed again', (r) => r.status === 200 && api.body(r).state === 'claimed' &&
      api.body(r).changed === true);

  // The audit trail comes from the ledger, which follows the engine: poll with a deadline.
  const aKey = sold.a.keys[0].key_id;
  const end = Date.now() + 30000;
  let events = api.keyEvents(aKey);
  const kinds = (r) => (r.status === 200 ? api.body(r).events.map((e) => e.kind) : []);
  while (!(kinds(events).includes('claim') && kinds(events).includes('redeem')) && Date.now() < end) {
    sleep(0.2);
    events = api.keyEvents(aKey);
  }
  verify(events, 'key events: claim and redeem in the audit trail', (r) =>
      kinds(r).includes('claim') && kinds(r).includes('redeem'));

  verify(api.reconcile(sku), 'reconcile: reports the SKU', (r) => r.status === 200 && api.body(r).skus[0].sku === sku);
}

function errors(data, prefix, sold) {
  const sku = data.skus.main;
  const noAuth = { 'Content-Type': 'application/json' };
  answers(api.rawPublic('POST', `/v1/skus/${sku}/claims`, JSON.stringify({ order_id: 'x' }), noAuth,
    'POST /v1/skus/{sku}/claims'), 401, 'ERR_UNAUTHORIZED', 'claim without token');
  answers(api.rawAdmin('PUT', `/v1/skus/${sku}`, '{}', noAuth, 'PUT /v1/skus/{sku}'),
    401, 'ERR_UNAUTHORIZED', 'admin route without token');
  answers(api.skuView(`${sku}-unknown`), 404, 'ERR_NOT_FOUND', 'unknown SKU');
  answers(api.order(sku, `${prefix}-never`), 404, 'ERR_NOT_FOUND', 'unknown order');
  const wrongMethod = api.rawPublic('DELETE', '/v1/redeem', null, {}, 'DELETE /v1/redeem');
  answers(wrongMethod, 405, 'ERR_METHOD_NOT_ALLOWED', 'DELETE /v1/redeem');
  verify(wrongMethod, 'DELETE /v1/redeem: Allow lists POST', (r) => (r.headers.Allow || '').includes('POST'));
  answers(api.rawPublic('POST', `/v1/skus/${sku}/claims`, '{"order_id":', api.merchantHeaders,
    'POST /v1/skus/{sku}/claims'), 400, 'ERR_BAD_REQUEST', 'malformed JSON');
  answers(api.rawPublic('POST', `/v1/skus/${sku}/claims`,
    JSON.stringify({ order_id: 'big', user_id: 'x'.repeat(intEnv('SMOKE_OVERSIZED_BYTES', 70000)) }),
    api.merchantHeaders, 'POST /v1/skus/{sku}/claims'), 413, 'ERR_PAYLOAD_TOO_LARGE', 'oversized body');
  answers(api.claim(sku, { order_id: `${prefix}-a`, quantity: 2, user_id: 'smoke-user' }),
    409, 'ERR_ORDER_CONFLICT', 'order id reused with other parameters');
  answers(api.release(sku, `${prefix}-a`), 409, 'ERR_ORDER_CONFLICT', 'release of a final claim');

  // The three failed redemptions of a run.
  const malformed = api.redeem('NOT!A-CODE', `${prefix}-prober`);
  answers(malformed, 422, 'ERR_CARD_MALFORMED', 'malformed code');
  verify(malformed, 'malformed code: a hint, not the code', (r) => {
    const e = api.body(r).error;
    return typeof e.hint === 'string' && e.hint.length > 0 && !JSON.stringify(e).includes('NOT!A');
  });
  answers(api.redeem(randomCrockford(20), `${prefix}-prober`), 404, 'ERR_CARD_INVALID', 'unknown code');
  const used = api.redeem(sold.a.keys[0].code, `${prefix}-someone-else`);
  answers(used, 409, 'ERR_CARD_USED', 'code redeemed by another');
  verify(used, 'code redeemed by another: masked redeemer and time', (r) => {
    const e = api.body(r).error;
    return typeof e.redeemed_at === 'string' && typeof e.redeemer === 'string' &&
      !e.redeemer.includes('redeemer');
  });

  answers(api.claim(data.skus.soldOut, { order_id: `${prefix}-so-1` }), 200, '', 'last code');
  answers(api.claim(data.skus.soldOut, { order_id: `${prefix}-so-2` }), 409, 'ERR_SOLD_OUT', 'no code left');

  answers(api.claim(data.skus.perUser, { order_id: `${prefix}-pu-1`, user_id: 'u-1' }), 200, '', 'per-user limit, first');
  answers(api.claim(data.skus.perUser, { order_id: `${prefix}-pu-2`, user_id: 'u-1' }), 409,
    'ERR_USER_LIMIT', 'per-user limit, second');

  const noLate = data.skus.noLate;
  answers(api.claim(noLate, { order_id: `${prefix}-nl`, hold_ms: 200 }), 200, '', 'short hold');
  const end = Date.now() + 30000;
  let state = '';
  while (state !== 'expired' && Date.now() < end) {
    const r = api.order(noLate, `${prefix}-nl`);
    state = r.status === 200 ? api.body(r).state : '';
    if (state !== 'expired') sleep(0.1);
  }
  verify(state, 'short hold: expired within 30 s', (s) => s === 'expired');
  answers(api.confirm(noLate, `${prefix}-nl`), 409, 'ERR_HOLD_EXPIRED', 'confirm after the hold lapsed');

  const formats = data.skus.formats;
  verify(api.putSku(formats, { format: { preset: 'crockford32', min_length: 16, max_length: 16 } }), 'format change: version 2', (r) => r.status === 200 && api.body(r).config.format_version === 2);
  verify(api.retireFormat(formats, 1, 'smoke test'), 'retire format 1: its unsold key voided', (r) => r.status === 200 && api.body(r).retired === true &&
      api.body(r).voided === 1);
}

export default function (data) {
  const pass = exec.scenario.iterationInTest;
  const prefix = `${data.run}-${pass}`;
  const sku = data.skus.main;
  group('admin probes', probes);
  const sold = group('claims', () => claims(sku, prefix));
  if (!sold.a.keys || !sold.b1 || !sold.b2) {
    expect(false, `pass ${pass}: claims failed, the rest of the pass is skipped`);
    return;
  }
  group('redemptions', () => redemptions(sku, prefix, sold));
  group('admin routes', () => admin(sku, prefix, sold));
  if (pass === 0) group('errors', () => errors(data, prefix, sold));
  group('metrics', metricsAfterTraffic);
}

export function teardown(data) {
  const { skus } = data;
  const main = settle(skus.main, 60000);
  expectCounts(skus.main, main, {
    available: IMPORTED + (ADDED_PER_PASS - CLAIMED_PER_PASS) * ITERATIONS,
    claimed: (CLAIMED_PER_PASS - REDEEMED_PER_PASS) * ITERATIONS,
    redeemed: REDEEMED_PER_PASS * ITERATIONS,
  }, IMPORTED + ADDED_PER_PASS * ITERATIONS);
  expectCounts(skus.soldOut, settle(skus.soldOut), { claimed: 1 }, 1);
  expectCounts(skus.perUser, settle(skus.perUser), { claimed: 1, available: 1 }, 2);
  expectCounts(skus.noLate, settle(skus.noLate), { available: 1 }, 1);
  expectCounts(skus.formats, settle(skus.formats), { void: 1 }, 1);
}

export const handleSummary = summaryHandler('smoke');
