// smoke — every route of both listeners a few times, and every documented error a client
// can provoke, each answer checked. One virtual user, SMOKE_ITERATIONS passes (default 3);
// the error paths run in the first pass only, so a run costs its client address three
// failed redemptions (the default lockout comes after ten in ten minutes).
//
// Teardown: each SKU's counts come to exactly what the passes did, in the engine and in
// the ledger, with no drift and nothing in flight.

import { group, sleep } from 'k6';
import exec from 'k6/execution';
import * as api from './lib/api.js';
import { verify } from './lib/checks.js';
import { intEnv, randomCrockford, runId, uniqueCodes } from './lib/env.js';
import { createSku, importCodes } from './lib/inventory.js';
import { expect, expectCounts, settle, startInvariants } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const ITERATIONS = intEnv('SMOKE_ITERATIONS', 3);
const P99_MS = intEnv('P99_MS', 1000);
/** A body just over the gateway's default `max_body_bytes` (64 KiB). */
const OVERSIZED_BYTES = intEnv('SMOKE_OVERSIZED_BYTES', 1 << 20);
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
    'http_req_duration{name:POST /v1/skus/{sku}/claims}': [`p(99)<${P99_MS}`],
    'http_req_duration{name:POST /v1/redeem}': [`p(99)<${P99_MS}`],
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

/** Logs the answer behind a failed check, so the summary's failure can be read. */
function explain(passed, name, res) {
  if (!passed) {
    console.warn(`check failed: ${name}: ${api.describe(res)} ${String(res.body).slice(0, 300)}`);
  }
  return passed;
}

/** Checks a 200 answer whose body satisfies `predicate(body)`. */
function ok(res, name, predicate = () => true) {
  return explain(verify(res, name, (r) => r.status === 200 && predicate(api.body(r))), name, res);
}

/** Checks an error answer: `status` and the envelope's `code`. */
function refused(res, status, code, label) {
  const name = `${label}: ${status} ${code}`;
  return explain(verify(res, name, (r) => r.status === status && api.errorCode(r) === code), name, res);
}

function probes() {
  ok(api.probe('/healthz'), 'GET /healthz: 200 ok', (b) => b.status === 'ok');
  ok(api.probe('/readyz'), 'GET /readyz: 200');
  verify(api.probe('/metrics'), 'GET /metrics: 200, engine up',
    (r) => r.status === 200 && /^kamigate_engine_up 1$/m.test(r.body));
}

/** After a pass's traffic, the series it must have moved are exported. */
function metricsAfterTraffic() {
  const metrics = api.probe('/metrics');
  ['kamigate_http_requests_total', 'kamigate_claims_total', 'kamigate_redemptions_total',
    'kamigate_import_rows_total'].forEach((name) => {
    verify(metrics, `GET /metrics after traffic: ${name}`,
      (r) => r.status === 200 && r.body.includes(`\n${name}{`));
  });
}

function claims(sku, prefix) {
  const claimA = () => api.claim(sku, { order_id: `${prefix}-a`, user_id: 'smoke-user' });
  const a = api.body(api.withRetry(claimA)) || {};
  verify(a, 'claim: claimed with one code', (o) => o.state === 'claimed' && o.keys.length === 1 &&
    typeof o.keys[0].code === 'string' && o.replayed === false);
  ok(api.withRetry(claimA), 'claim retried: the same code, replayed',
    (o) => o.replayed === true && o.keys[0].code === a.keys[0].code);

  const batch = api.withRetry(() => api.claimBatch(sku, [
    { order_id: `${prefix}-b1` },
    { order_id: `${prefix}-b2`, quantity: 2 },
  ]));
  const both = (api.body(batch) || {}).claims || [];
  ok(batch, 'batch claim: one answer per claim, in order', () => both.length === 2 &&
    both[0].order_id === `${prefix}-b1` && both[0].keys.length === 1 &&
    both[1].order_id === `${prefix}-b2` && both[1].keys.length === 2);

  ok(api.order(sku, `${prefix}-a`), 'GET order: the claimed code',
    (o) => o.keys[0].code === a.keys[0].code);

  const hold = () => api.claim(sku, { order_id: `${prefix}-h`, hold_ms: 60000 });
  ok(api.withRetry(hold), 'hold: held, key listed without its code', (o) => o.state === 'held' &&
    o.keys.length === 1 && o.keys[0].code === undefined && o.hold_expires_at !== null);
  ok(api.withRetry(() => api.confirm(sku, `${prefix}-h`)), 'confirm: claimed, code revealed, not late',
    (o) => o.state === 'claimed' && typeof o.keys[0].code === 'string' && o.late === false);
  ok(api.withRetry(() => api.confirm(sku, `${prefix}-h`)), 'confirm retried: replayed',
    (o) => o.replayed === true);

  const cancel = () => api.claim(sku, { order_id: `${prefix}-r`, hold_ms: 60000 });
  ok(api.withRetry(cancel), 'hold to release: held', (o) => o.state === 'held');
  ok(api.withRetry(() => api.release(sku, `${prefix}-r`)), 'release: released',
    (o) => o.state === 'released');
  ok(api.withRetry(() => api.release(sku, `${prefix}-r`)), 'release retried: replayed',
    (o) => o.replayed === true);

  ok(api.skuView(sku), 'GET /v1/skus/{sku} (merchant): counts by state',
    (v) => typeof v.engine.available === 'number' && typeof v.drift === 'number');
  ok(api.adminSkuView(sku), 'GET /v1/skus/{sku} (admin): counts by state', (v) => v.sku === sku);
  return { a, b1: both[0], b2: both[1] };
}

function redemptions(sku, prefix, sold) {
  const code = sold.a.keys[0].code;
  const redeemA = () => api.redeem(code, `${prefix}-redeemer`);
  const first = api.withRetry(redeemA);
  if (api.errorCode(first) === 'ERR_LOCKED_OUT') {
    console.error('this client address is locked out after failed redemptions of earlier runs: ' +
      'wait for the lockout to end, or run from another address (--local-ips)');
  }
  ok(first, 'redeem through the global index: redeemed', (r) =>
    r.state === 'redeemed' && r.key_id === sold.a.keys[0].key_id && r.replayed === false);
  ok(api.withRetry(redeemA), 'redeem retried by the same redeemer: replayed',
    (r) => r.replayed === true);
  const lower = sold.b1.keys[0].code.toLowerCase();
  ok(api.withRetry(() => api.redeem(lower, `${prefix}-redeemer-b`, sku)),
    'redeem naming the SKU, in lower case: redeemed', (r) => r.sku === sku);
}

function adminRoutes(sku, prefix, sold) {
  const batchId = `${prefix}-extra`;
  ok(api.importBatch(sku, batchId, uniqueCodes(ADDED_PER_PASS), false), 'import activate=false: pending',
    (b) => b.state === 'pending' && b.accepted === ADDED_PER_PASS);
  ok(api.importBatch(sku, batchId, uniqueCodes(ADDED_PER_PASS), false),
    'the same batch_id again: replayed, nothing added',
    (b) => b.replayed === true && b.accepted === ADDED_PER_PASS);
  ok(api.activateBatch(sku, batchId), 'activate: active',
    (b) => b.state === 'active' && b.loaded === ADDED_PER_PASS);
  ok(api.warm(sku), 'warm: 200', (b) => typeof b.present === 'number');

  const keyId = sold.b2.keys[0].key_id;
  ok(api.voidKey(keyId, 'smoke test'), 'void: void', (b) => b.state === 'void' && b.changed === true);
  ok(api.restoreKey(keyId, 'smoke test'), 'restore: claimed again',
    (b) => b.state === 'claimed' && b.changed === true);

  // The audit trail comes from the ledger, which follows the engine: poll with a deadline.
  const aKey = sold.a.keys[0].key_id;
  const kinds = (r) => (r.status === 200 ? api.body(r).events.map((e) => e.kind) : []);
  const complete = (r) => kinds(r).includes('claim') && kinds(r).includes('redeem');
  const end = Date.now() + 30000;
  let events = api.keyEvents(aKey);
  while (!complete(events) && Date.now() < end) {
    sleep(0.2);
    events = api.keyEvents(aKey);
  }
  verify(events, 'key events: claim and redeem in the audit trail', complete);

  ok(api.reconcile(sku), 'reconcile: reports the SKU', (b) => b.skus[0].sku === sku);
}

/**
 * Sends a body over the limit. The gateway answers 413 from the declared length, with
 * `Connection: close`, and reads what the client still sends before closing, so the answer
 * arrives however much of the body is still on its way: no retry.
 */
function oversized(path, route) {
  const big = JSON.stringify({ order_id: 'big', user_id: 'x'.repeat(OVERSIZED_BYTES) });
  return api.rawPublic('POST', path, big, api.merchantHeaders, route);
}

function errors(data, prefix, sold) {
  const sku = data.skus.main;
  const claimsPath = `/v1/skus/${sku}/claims`;
  const claimsRoute = 'POST /v1/skus/{sku}/claims';
  const json = { 'Content-Type': 'application/json' };
  refused(api.rawPublic('POST', claimsPath, '{"order_id":"x"}', json, claimsRoute),
    401, 'ERR_UNAUTHORIZED', 'claim without token');
  refused(api.rawAdmin('PUT', `/v1/skus/${sku}`, '{}', json, 'PUT /v1/skus/{sku}'),
    401, 'ERR_UNAUTHORIZED', 'admin route without token');
  refused(api.skuView(`${sku}-unknown`), 404, 'ERR_NOT_FOUND', 'unknown SKU');
  refused(api.order(sku, `${prefix}-never`), 404, 'ERR_NOT_FOUND', 'unknown order');
  const wrongMethod = api.rawPublic('DELETE', '/v1/redeem', null, {}, 'DELETE /v1/redeem');
  refused(wrongMethod, 405, 'ERR_METHOD_NOT_ALLOWED', 'DELETE /v1/redeem');
  verify(wrongMethod, 'DELETE /v1/redeem: Allow lists POST', (r) => r.headers.Allow.includes('POST'));
  refused(api.rawPublic('POST', claimsPath, '{"order_id":', api.merchantHeaders, claimsRoute),
    400, 'ERR_BAD_REQUEST', 'malformed JSON');
  refused(oversized(claimsPath, claimsRoute), 413, 'ERR_PAYLOAD_TOO_LARGE', 'oversized body');
  refused(api.claim(sku, { order_id: `${prefix}-a`, quantity: 2, user_id: 'smoke-user' }),
    409, 'ERR_ORDER_CONFLICT', 'order id reused with other parameters');
  refused(api.release(sku, `${prefix}-a`), 409, 'ERR_ORDER_CONFLICT', 'release of a final claim');

  // The run's three failed redemptions.
  const malformed = api.redeem('NOT!A-CODE', `${prefix}-prober`);
  refused(malformed, 422, 'ERR_CARD_MALFORMED', 'malformed code');
  verify(api.body(malformed), 'malformed code: a hint, never the code', (b) =>
    b.error.hint.length > 0 && !JSON.stringify(b).includes('NOT!A'));
  refused(api.redeem(randomCrockford(20), `${prefix}-prober`), 404, 'ERR_CARD_INVALID', 'unknown code');
  const used = api.redeem(sold.a.keys[0].code, `${prefix}-someone-else`);
  refused(used, 409, 'ERR_CARD_USED', 'code redeemed by another');
  verify(api.body(used), 'code redeemed by another: when, and by whom masked', (b) =>
    typeof b.error.redeemed_at === 'string' && !b.error.redeemer.includes('redeemer'));

  ok(api.claim(data.skus.soldOut, { order_id: `${prefix}-so-1` }), 'the last code: claimed');
  refused(api.claim(data.skus.soldOut, { order_id: `${prefix}-so-2` }), 409, 'ERR_SOLD_OUT',
    'no code left');

  const perUser = data.skus.perUser;
  ok(api.claim(perUser, { order_id: `${prefix}-pu-1`, user_id: 'u-1' }),
    'per-user limit 1: first claimed');
  refused(api.claim(perUser, { order_id: `${prefix}-pu-2`, user_id: 'u-1' }), 409, 'ERR_USER_LIMIT',
    'per-user limit 1: second');

  const noLate = data.skus.noLate;
  ok(api.claim(noLate, { order_id: `${prefix}-nl`, hold_ms: 200 }), 'short hold: held');
  const end = Date.now() + 30000;
  let state = '';
  while (state !== 'expired' && Date.now() < end) {
    const r = api.order(noLate, `${prefix}-nl`);
    state = r.status === 200 ? api.body(r).state : '';
    if (state !== 'expired') sleep(0.1);
  }
  verify(state, 'short hold: expired within 30 s', (s) => s === 'expired');
  refused(api.confirm(noLate, `${prefix}-nl`), 409, 'ERR_HOLD_EXPIRED', 'confirm after the hold lapsed');

  const formats = data.skus.formats;
  const crockford = { format: { preset: 'crockford32', min_length: 16, max_length: 16 } };
  ok(api.putSku(formats, crockford), 'format change: version 2', (b) => b.config.format_version === 2);
  ok(api.retireFormat(formats, 1, 'smoke test'), 'retire format 1: its unsold key voided',
    (b) => b.retired === true && b.voided === 1);
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
  group('admin routes', () => adminRoutes(sku, prefix, sold));
  if (pass === 0) group('errors', () => errors(data, prefix, sold));
  group('metrics', metricsAfterTraffic);
}

export function teardown(data) {
  const { skus } = data;
  expectCounts(skus.main, settle(skus.main), {
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
