// hold_and_pay — reservations, as a shop's checkout makes them: ORDERS orders (default
// 400), each first a hold (`hold_ms`), then, by the order's number:
//
//   2 in 5  confirmed while held (payment arrived): claimed, not late;
//   1 in 5  released (cancelled): the code goes back to inventory;
//   1 in 5  left alone until the hold lapses: expired, the code back in inventory;
//   1 in 5  confirmed late, after its hold lapsed: a fresh code is claimed (`late: true`),
//           and confirming again replays that answer.
//
// Short holds last SHORT_HOLD_MS (default 1000); the others LONG_HOLD_MS (default 120000),
// far longer than a confirm or a release takes. A late confirm first polls the order until
// the gateway reports it expired, so nothing depends on timing.
//
// Teardown waits (with a deadline) until no hold is left, then reads every order back and
// checks its final state against what was done to it, and that the SKU's counts add up:
// claimed = confirmed + confirmed late, available = stock - claimed, held 0, in the engine
// and in the ledger, drift 0, nothing in flight.

import { sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import * as api from './lib/api.js';
import { intEnv, runId, uniqueCodes } from './lib/env.js';
import { createSku, importCodes, readOrders } from './lib/inventory.js';
import { expect, expectCounts, settle, startInvariants, violation } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const ORDERS = intEnv('ORDERS', 400);
const SHORT_HOLD_MS = intEnv('SHORT_HOLD_MS', 1000);
const LONG_HOLD_MS = intEnv('LONG_HOLD_MS', 120000);
const P99_MS = intEnv('P99_MS', 1000);
/** Every order can be held at once, so no hold meets an empty SKU. */
const STOCK = ORDERS;

const FATES = ['confirm', 'confirm', 'release', 'expire', 'late'];
const fateOf = (i) => FATES[i % FATES.length];
const count = (fate) => {
  let n = 0;
  for (let i = 0; i < ORDERS; i++) if (fateOf(i) === fate) n++;
  return n;
};

const placed = new Counter('holds_placed');
const confirmed = new Counter('holds_confirmed');
const released = new Counter('holds_released');
const leftToExpire = new Counter('holds_left_to_expire');
const confirmedLate = new Counter('holds_confirmed_late');
const unexpected = new Counter('unexpected_answers');
const holdDuration = new Trend('hold_duration', true);
const payDuration = new Trend('confirm_release_duration', true);

export const options = {
  scenarios: {
    hold_and_pay: {
      executor: 'shared-iterations',
      vus: intEnv('VUS', 20),
      iterations: ORDERS,
      maxDuration: '10m',
    },
  },
  thresholds: {
    holds_placed: [`count==${ORDERS}`],
    holds_confirmed: [`count==${count('confirm')}`],
    holds_released: [`count==${count('release')}`],
    holds_left_to_expire: [`count==${count('expire')}`],
    holds_confirmed_late: [`count==${count('late')}`],
    unexpected_answers: ['count==0'],
    invariant_violations: ['count==0'],
    hold_duration: [`p(99)<${P99_MS}`],
    confirm_release_duration: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
  setupTimeout: '5m',
  teardownTimeout: '10m',
};

export function setup() {
  startInvariants();
  [placed, confirmed, released, leftToExpire, confirmedLate, unexpected].forEach((c) => c.add(0));
  const run = runId();
  const sku = `holds-${run}`;
  createSku(sku, {});
  importCodes(sku, uniqueCodes(STOCK), `${run}-stock`);
  return { run, sku };
}

function wrong(orderId, what, res) {
  unexpected.add(1);
  console.warn(`order ${orderId}: ${what}: ${api.describe(res)} ${String(res.body).slice(0, 300)}`);
}

/** Polls the order until the gateway reports its hold lapsed; false after the deadline. */
function awaitExpiry(sku, orderId, deadlineMs) {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const res = api.withRetry(() => api.order(sku, orderId));
    if (res.status === 200 && api.body(res).state === 'expired') return true;
    if (Date.now() >= end) return false;
    sleep(0.1);
  }
}

/** An order claimed with one code revealed, `late` as given. */
function isClaimed(o, late) {
  return o && o.state === 'claimed' && o.late === late && o.keys.length === 1 && Boolean(o.keys[0].code);
}

export default function (data) {
  const { sku, run } = data;
  const i = exec.scenario.iterationInTest;
  const orderId = `${run}-${i}`;
  const fate = fateOf(i);
  const holdMs = fate === 'expire' || fate === 'late' ? SHORT_HOLD_MS : LONG_HOLD_MS;

  const request = { order_id: orderId, hold_ms: holdMs, user_id: `payer-${i}` };
  const hold = api.withRetry(() => api.claim(sku, request));
  const held = api.body(hold);
  if (hold.status !== 200 || !held || held.state !== 'held' || held.keys.length !== 1 ||
      held.keys[0].code) {
    wrong(orderId, 'hold', hold);
    return;
  }
  placed.add(1);
  holdDuration.add(hold.timings.duration);

  if (fate === 'confirm') {
    const res = api.withRetry(() => api.confirm(sku, orderId));
    const o = api.body(res);
    if (res.status === 200 && isClaimed(o, false)) {
      confirmed.add(1);
      payDuration.add(res.timings.duration);
    } else {
      wrong(orderId, 'confirm while held', res);
    }
  } else if (fate === 'release') {
    const res = api.withRetry(() => api.release(sku, orderId));
    if (res.status === 200 && api.body(res).state === 'released') {
      released.add(1);
      payDuration.add(res.timings.duration);
    } else {
      wrong(orderId, 'release', res);
    }
  } else if (fate === 'expire') {
    leftToExpire.add(1);
  } else {
    if (!awaitExpiry(sku, orderId, SHORT_HOLD_MS + 60000)) {
      unexpected.add(1);
      console.warn(`order ${orderId}: hold of ${SHORT_HOLD_MS} ms not reported expired ` +
        'within 60 s of lapsing');
      return;
    }
    const res = api.withRetry(() => api.confirm(sku, orderId));
    const o = api.body(res);
    if (!(res.status === 200 && isClaimed(o, true))) {
      wrong(orderId, 'late confirm', res);
      return;
    }
    const again = api.withRetry(() => api.confirm(sku, orderId));
    const a = api.body(again);
    if (again.status === 200 && a.replayed === true && a.keys[0].code === o.keys[0].code) {
      confirmedLate.add(1);
    } else {
      wrong(orderId, 'late confirm retried', again);
    }
  }
}

/** What each fate leaves an order as, read back. */
function expectedOrder(fate) {
  switch (fate) {
    case 'confirm': return { state: 'claimed', late: false };
    case 'release': return { state: 'released' };
    case 'expire': return { state: 'expired' };
    default: return { state: 'claimed', late: true };
  }
}

export function teardown(data) {
  const { sku, run } = data;
  const view = settle(sku, SHORT_HOLD_MS + 60000,
    (v) => v.engine.held === 0 && v.ledger.held === 0, 'every hold to be confirmed, released or lapsed');
  const claimed = count('confirm') + count('late');
  expectCounts(sku, view, { claimed, available: STOCK - claimed }, STOCK);

  const ids = [];
  for (let i = 0; i < ORDERS; i++) ids.push(`${run}-${i}`);
  const orders = readOrders(sku, ids);
  const codes = new Set();
  let claimedCodes = 0;
  ids.forEach((id, i) => {
    const o = orders[id];
    const want = expectedOrder(fateOf(i));
    if (!o || o.error) {
      violation(`order ${id} (${fateOf(i)}) could not be read back: ${o ? o.error : '404'}`);
      return;
    }
    if (o.state !== want.state || (want.late !== undefined && o.late !== want.late)) {
      violation(`order ${id} (${fateOf(i)}) is ${o.state}${o.late ? ' (late)' : ''}, ` +
        `expected ${want.state}${want.late ? ' (late)' : ''}`);
      return;
    }
    if (o.state === 'claimed') {
      o.keys.forEach((k) => {
        claimedCodes += 1;
        codes.add(k.code);
      });
    }
  });
  expect(codes.size === claimedCodes, `${claimedCodes - codes.size} codes went to more than one order`);
  expect(claimedCodes === claimed, `${claimedCodes} codes in claimed orders, expected ${claimed}`);
}

export const handleSummary = summaryHandler('hold_and_pay');
