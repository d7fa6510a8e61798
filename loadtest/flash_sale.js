// flash_sale — a spike of many buyers for little stock. A ramping arrival rate of buyers,
// each claiming one code for its own order, against STOCK codes (default 100): exactly
// STOCK claims succeed, every other buyer is answered ERR_SOLD_OUT, and no code goes to two
// orders. A claim answered 503 (shed, or the ledger slow) is retried with the same order id,
// as a client does; the gateway answers it as it answered first.
//
// Teardown reads every order back: the orders that exist are exactly STOCK claimed orders
// with STOCK distinct codes, and the SKU's counts agree (engine and ledger, drift 0,
// nothing in flight).
//
// The shape: START_RATE buyers/s rising to PEAK_RATE over RAMP_SECS, PEAK_SECS at the
// peak, down to 0 over DOWN_SECS. Latency: p(99) of admitted claims (answered by the
// engine: claimed or sold out) under P99_MS.

import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import * as api from './lib/api.js';
import { intEnv, runId, uniqueCodes } from './lib/env.js';
import { createSku, importCodes, readOrders } from './lib/inventory.js';
import { expect, expectCounts, settle, startInvariants, violation } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const STOCK = intEnv('STOCK', 100);
const START_RATE = intEnv('START_RATE', 20);
const PEAK_RATE = intEnv('PEAK_RATE', 400);
const RAMP_SECS = intEnv('RAMP_SECS', 3);
const PEAK_SECS = intEnv('PEAK_SECS', 5);
const DOWN_SECS = intEnv('DOWN_SECS', 2);
const P99_MS = intEnv('P99_MS', 1000);

/** Most buyers the stages can start: every order id a buyer can have is below this. */
const MAX_BUYERS = Math.ceil((START_RATE + PEAK_RATE) / 2 * RAMP_SECS + PEAK_RATE * PEAK_SECS +
  PEAK_RATE / 2 * DOWN_SECS) + PEAK_RATE + 10;

const claimsWon = new Counter('claims_won');
const claimsSoldOut = new Counter('claims_sold_out');
const unexpected = new Counter('unexpected_answers');
const codesIssued = new Counter('codes_issued');
const doubleSold = new Counter('double_sold');
const admitted = new Trend('claim_admitted_duration', true);

export const options = {
  scenarios: {
    flash_sale: {
      executor: 'ramping-arrival-rate',
      startRate: START_RATE,
      timeUnit: '1s',
      preAllocatedVUs: intEnv('PRE_VUS', 50),
      maxVUs: intEnv('MAX_VUS', 300),
      stages: [
        { target: PEAK_RATE, duration: `${RAMP_SECS}s` },
        { target: PEAK_RATE, duration: `${PEAK_SECS}s` },
        { target: 0, duration: `${DOWN_SECS}s` },
      ],
    },
  },
  thresholds: {
    claims_won: [`count==${STOCK}`],
    claims_sold_out: ['count>0'],
    unexpected_answers: ['count==0'],
    double_sold: ['count==0'],
    invariant_violations: ['count==0'],
    claim_admitted_duration: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
  setupTimeout: '5m',
  teardownTimeout: '10m',
};

export function setup() {
  startInvariants();
  [claimsWon, claimsSoldOut, unexpected, doubleSold].forEach((c) => c.add(0));
  const run = runId();
  const sku = `flash-${run}`;
  createSku(sku, {});
  importCodes(sku, uniqueCodes(STOCK), `${run}-stock`);
  return { run, sku };
}

export default function (data) {
  const buyer = exec.scenario.iterationInTest;
  const res = api.withRetry(() => api.claim(data.sku, {
    order_id: `${data.run}-${buyer}`,
    user_id: `buyer-${buyer}`,
  }), 60000);
  const code = api.errorCode(res);
  if (res.status === 200) {
    const order = api.body(res);
    if (order && order.state === 'claimed' && order.keys.length === 1 && order.keys[0].code) {
      claimsWon.add(1);
      codesIssued.add(1);
    } else {
      unexpected.add(1);
      console.warn(`buyer ${buyer}: 200 without one claimed code: ${res.body}`);
    }
    admitted.add(res.timings.duration);
  } else if (res.status === 409 && code === 'ERR_SOLD_OUT') {
    claimsSoldOut.add(1);
    admitted.add(res.timings.duration);
  } else {
    unexpected.add(1);
    console.warn(`buyer ${buyer}: ${api.describe(res)}`);
  }
}

export function teardown(data) {
  const { sku, run } = data;
  const view = settle(sku, 60000);
  expectCounts(sku, view, { claimed: STOCK }, STOCK);

  const ids = [];
  for (let i = 0; i < MAX_BUYERS; i++) ids.push(`${run}-${i}`);
  const orders = readOrders(sku, ids);
  const codes = new Set();
  const keyIds = new Set();
  let claimed = 0;
  let keys = 0;
  ids.forEach((id) => {
    const o = orders[id];
    if (o === null) return;
    if (o.error) {
      violation(`order ${id} could not be read back: ${o.error}`);
      return;
    }
    if (o.state !== 'claimed' || o.keys.length !== 1) {
      violation(`order ${id} is ${o.state} with ${o.keys.length} keys, expected claimed with 1`);
      return;
    }
    claimed += 1;
    o.keys.forEach((k) => {
      keys += 1;
      codes.add(k.code);
      keyIds.add(k.key_id);
    });
  });
  expect(claimed === STOCK, `${claimed} orders read back claimed, expected ${STOCK}`);
  const twice = Math.max(keys - codes.size, keys - keyIds.size);
  doubleSold.add(twice);
  expect(twice === 0, `${twice} codes were issued to more than one order`);
}

export const handleSummary = summaryHandler('flash_sale');
