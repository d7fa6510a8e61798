// soak — a steady mix of everything at a constant arrival rate for a long time, to find
// what only time shows: leaks, a ledger writer falling behind, drift, latency creeping up.
// SOAK_RATE iterations/s (default 20) for SOAK_DURATION (default 30s; `1h` for the real
// thing). Each iteration, by its number, out of ten:
//
//   5  a claim, then its code redeemed by the holder;
//   2  a hold, confirmed, then redeemed;
//   1  a hold, released;
//   1  a claim sent twice (the retry replays the same code), redeemed twice by the holder
//      (the second replays);
//   1  a batch claim of two orders, both codes redeemed.
//
// Half the redemptions name the SKU, half go through the global index. Every answer is
// checked: a code issued twice would surface as a holder's redemption refused.
//
// Teardown: no hold left, every claimed code redeemed, engine and ledger agree with the
// stock imported, drift 0, nothing in flight.

import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import * as api from './lib/api.js';
import { intEnv, runId, strEnv, uniqueCodes } from './lib/env.js';
import { createSku, importCodes } from './lib/inventory.js';
import { expectCounts, settle, startInvariants } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const DURATION = strEnv('SOAK_DURATION', '30s');
const RATE = intEnv('SOAK_RATE', 20);
const HOLD_MS = intEnv('HOLD_MS', 60000);
const P99_MS = intEnv('P99_MS', 1000);

function seconds(duration) {
  const parts = String(duration).match(/^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/);
  if (!parts || duration === '') {
    throw new Error(`SOAK_DURATION=${duration}: expected e.g. 30s, 10m, 1h, 1h30m`);
  }
  return (Number(parts[1] || 0) * 60 + Number(parts[2] || 0)) * 60 + Number(parts[3] || 0);
}

/** Codes for every iteration the rate can start (one each on average), and a margin. */
const STOCK = Math.ceil(RATE * seconds(DURATION) * 1.2) + 200;

const claimed = new Counter('codes_claimed');
const redeemed = new Counter('codes_redeemed');
const released = new Counter('holds_released');
const unexpected = new Counter('unexpected_answers');

export const options = {
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: intEnv('PRE_VUS', 20),
      maxVUs: intEnv('MAX_VUS', 200),
    },
  },
  thresholds: {
    unexpected_answers: ['count==0'],
    invariant_violations: ['count==0'],
    codes_redeemed: ['count>0'],
    'http_req_duration{name:POST /v1/skus/{sku}/claims}': [`p(99)<${P99_MS}`],
    'http_req_duration{name:POST /v1/redeem}': [`p(99)<${P99_MS}`],
    'http_req_duration{name:POST /v1/skus/{sku}/claims/{order_id}/confirm}': [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
  setupTimeout: '20m',
  teardownTimeout: '10m',
};

export function setup() {
  startInvariants();
  [claimed, redeemed, released, unexpected].forEach((c) => c.add(0));
  const run = runId();
  const sku = `soak-${run}`;
  createSku(sku, {});
  importCodes(sku, uniqueCodes(STOCK), `${run}-stock`);
  return { run, sku };
}

function wrong(what, res) {
  unexpected.add(1);
  console.warn(`${what}: ${api.describe(res)} ${String(res.body).slice(0, 300)}`);
  return null;
}

/** A final claim or a hold; the order, or null (counted) when it was not what it should be. */
function claimOne(sku, orderId, holdMs) {
  const body = holdMs ? { order_id: orderId, hold_ms: holdMs } : { order_id: orderId };
  const res = api.withRetry(() => api.claim(sku, body));
  const o = api.body(res);
  const want = holdMs ? 'held' : 'claimed';
  if (res.status !== 200 || !o || o.state !== want || o.keys.length !== 1) {
    return wrong(`claim ${orderId}`, res);
  }
  if (!holdMs) claimed.add(1);
  return o;
}

function redeemOne(sku, code, redeemer, named, replay = false) {
  const res = api.withRetry(() => api.redeem(code, redeemer, named ? sku : undefined));
  const r = api.body(res);
  if (res.status !== 200 || !r || r.state !== 'redeemed' || r.replayed !== replay) {
    return wrong(`redeem${replay ? ' again' : ''} by ${redeemer}`, res);
  }
  if (!replay) redeemed.add(1);
  return r;
}

export default function (data) {
  const { sku, run } = data;
  const i = exec.scenario.iterationInTest;
  const orderId = `${run}-${i}`;
  const redeemer = `holder-${run}-${i}`;
  const named = i % 2 === 0;
  const kind = i % 10;

  if (kind < 5) {
    const o = claimOne(sku, orderId);
    if (o) redeemOne(sku, o.keys[0].code, redeemer, named);
  } else if (kind < 7) {
    if (!claimOne(sku, orderId, HOLD_MS)) return;
    const res = api.withRetry(() => api.confirm(sku, orderId));
    const o = api.body(res);
    if (res.status !== 200 || !o || o.state !== 'claimed' || !o.keys[0].code) {
      wrong(`confirm ${orderId}`, res);
      return;
    }
    claimed.add(1);
    redeemOne(sku, o.keys[0].code, redeemer, named);
  } else if (kind === 7) {
    if (!claimOne(sku, orderId, HOLD_MS)) return;
    const res = api.withRetry(() => api.release(sku, orderId));
    if (res.status === 200 && api.body(res).state === 'released') released.add(1);
    else wrong(`release ${orderId}`, res);
  } else if (kind === 8) {
    const o = claimOne(sku, orderId);
    if (!o) return;
    const again = api.withRetry(() => api.claim(sku, { order_id: orderId }));
    const a = api.body(again);
    if (again.status !== 200 || !a || a.replayed !== true || a.keys[0].code !== o.keys[0].code) {
      wrong(`claim ${orderId} retried`, again);
      return;
    }
    if (redeemOne(sku, o.keys[0].code, redeemer, named)) {
      redeemOne(sku, o.keys[0].code, redeemer, named, true);
    }
  } else {
    const ids = [`${orderId}-a`, `${orderId}-b`];
    const res = api.withRetry(() => api.claimBatch(sku, ids.map((id) => ({ order_id: id }))));
    const answers = ((api.body(res) || {}).claims || []).map((o, k) => {
      if (!o.error || o.error.code !== 'ERR_UNAVAILABLE') return o;
      // Answered 503 on its own: the same order again replays or finishes it.
      const again = api.withRetry(() => api.claim(sku, { order_id: ids[k] }));
      return again.status === 200 ? api.body(again) : o;
    });
    if (res.status !== 200 || answers.length !== 2 || answers.some((o) => o.state !== 'claimed')) {
      wrong(`batch claim ${orderId}: ${JSON.stringify(answers).slice(0, 300)}`, res);
      return;
    }
    answers.forEach((o, k) => {
      claimed.add(1);
      redeemOne(sku, o.keys[0].code, `${redeemer}-${k}`, named);
    });
  }
}

export function teardown(data) {
  const view = settle(data.sku, HOLD_MS + 60000, (v) => v.engine.held === 0,
    'every hold to be confirmed, released or lapsed');
  if (!view) return;
  // Every claimed code was redeemed by its iteration: what is not available is redeemed.
  const available = view.engine.available;
  expectCounts(data.sku, view, { available, redeemed: STOCK - available }, STOCK);
}

export const handleSummary = summaryHandler('soak');
