// The invariants a scenario checks through the API when its load is over: the SKU's counts
// by state in the engine and in the ledger agree with each other and with what the
// scenario did, no key drifts, and no event is left in flight.
//
// A broken invariant is counted in `invariant_violations` (every scenario holds it to
// `count==0`) and logged, so the run fails and its summary says why.

import { sleep } from 'k6';
import { Counter } from 'k6/metrics';
import { body, describe, skuView, withRetry } from './api.js';

export const violations = new Counter('invariant_violations');

export const STATES = ['available', 'held', 'claimed', 'redeemed', 'void'];

/** Records a broken invariant. */
export function violation(message) {
  violations.add(1);
  console.error(`invariant violated: ${message}`);
}

/** Gives the violation counter a sample, so its threshold is judged even when all is well. */
export function startInvariants() {
  violations.add(0);
}

/** Whether `condition` holds, recording a violation with `message` when it does not. */
export function expect(condition, message) {
  if (!condition) violation(message);
  return condition;
}

function quiet(view) {
  return view.in_flight === 0 && view.drift === 0 &&
    STATES.every((s) => view.engine[s] === view.ledger[s]);
}

function differences(view) {
  const out = [];
  if (view.in_flight !== 0) out.push(`in_flight ${view.in_flight}`);
  if (view.drift !== 0) out.push(`drift ${view.drift}`);
  STATES.forEach((s) => {
    if (view.engine[s] !== view.ledger[s]) {
      out.push(`${s}: engine ${view.engine[s]}, ledger ${view.ledger[s]}`);
    }
  });
  return out;
}

/**
 * Polls `GET /v1/skus/{sku}` until no event is in flight, drift is 0, the engine and the
 * ledger agree on every state and `until(view)` holds, or `deadlineMs` passed (a
 * violation). The ledger writer lags the engine, so this waits for it; it never assumes.
 * Returns the last view.
 */
export function settle(sku, deadlineMs = 60000, until = () => true, what = '') {
  const end = Date.now() + deadlineMs;
  let view = null;
  for (;;) {
    const res = withRetry(() => skuView(sku), 30000);
    if (res.status !== 200) {
      violation(`GET /v1/skus/${sku}: ${describe(res)}`);
      return null;
    }
    view = body(res);
    if (quiet(view) && until(view)) return view;
    if (Date.now() >= end) break;
    sleep(0.2);
  }
  const open = differences(view);
  if (!until(view)) open.push(`still waiting for ${what || 'the scenario condition'}`);
  violation(`${sku} did not settle within ${deadlineMs} ms: ${open.join('; ')} ` +
    `(engine ${JSON.stringify(view.engine)}, ledger ${JSON.stringify(view.ledger)})`);
  return view;
}

/**
 * Checks the SKU's counts: every state named in `expected` equals it in the engine and in
 * the ledger; every state not named must be 0. `imported` is what the sum must come to.
 */
export function expectCounts(sku, view, expected, imported) {
  if (!view) return;
  STATES.forEach((s) => {
    const want = expected[s] === undefined ? 0 : expected[s];
    expect(view.engine[s] === want, `${sku}: engine ${s} is ${view.engine[s]}, expected ${want}`);
    expect(view.ledger[s] === want, `${sku}: ledger ${s} is ${view.ledger[s]}, expected ${want}`);
  });
  if (imported !== undefined) {
    const total = STATES.reduce((sum, s) => sum + view.engine[s], 0);
    expect(total === imported, `${sku}: engine holds ${total} keys, ${imported} were imported`);
  }
  expect(view.drift === 0, `${sku}: drift ${view.drift}`);
  expect(view.in_flight === 0, `${sku}: ${view.in_flight} events still in flight`);
}
