// redemption_storm — every sold code redeemed at once by its holder, and a share of them
// by someone else too. Setup imports CODES codes (default 1000) and claims them all; then
// each code is one iteration, by its number:
//
//   1 in REUSE_EVERY (default 5)  raced: holder and another redeemer at the same moment;
//                                 exactly one wins, the other gets ERR_CARD_USED;
//   1 in REUSE_EVERY              redeemed by the holder, then by another redeemer
//                                 (ERR_CARD_USED), then by the holder again (replayed);
//   the rest                      redeemed once by the holder.
//
// Half the redemptions name the SKU, half find the code through the global index. Every
// code is redeemed exactly once: `double_redeemed` must stay 0, and the SKU ends with every
// code redeemed, in the engine and the ledger, drift 0, nothing in flight.
//
// Every ERR_CARD_USED is a failed redemption for the client address: against a gateway
// with the default lockout (10 per 10 minutes) run it from many addresses (--local-ips) or
// with limits.failed_redemptions raised; loadtest/run raises it.

import http from 'k6/http';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import * as api from './lib/api.js';
import { intEnv, runId, uniqueCodes } from './lib/env.js';
import { claimCodes, createSku, importCodes } from './lib/inventory.js';
import { expectCounts, settle, startInvariants } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const CODES = intEnv('CODES', 1000);
const REUSE_EVERY = Math.max(1, intEnv('REUSE_EVERY', 5));
const P99_MS = intEnv('P99_MS', 1000);

const isRace = (i) => i % REUSE_EVERY === 0;
const isReuse = (i) => REUSE_EVERY > 1 && i % REUSE_EVERY === 1;
let usedExpected = 0;
for (let i = 0; i < CODES; i++) if (isRace(i) || isReuse(i)) usedExpected++;

const redeemed = new Counter('codes_redeemed');
const used = new Counter('card_used_answers');
const replays = new Counter('redemption_replays');
const doubleRedeemed = new Counter('double_redeemed');
const unexpected = new Counter('unexpected_answers');
const redeemDuration = new Trend('redeem_duration', true);

export const options = {
  scenarios: {
    redemption_storm: {
      executor: 'shared-iterations',
      vus: intEnv('VUS', 30),
      iterations: CODES,
      maxDuration: '10m',
    },
  },
  thresholds: {
    codes_redeemed: [`count==${CODES}`],
    card_used_answers: [`count==${usedExpected}`],
    double_redeemed: ['count==0'],
    unexpected_answers: ['count==0'],
    invariant_violations: ['count==0'],
    redeem_duration: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
  setupTimeout: '10m',
  teardownTimeout: '5m',
};

export function setup() {
  startInvariants();
  [redeemed, used, replays, doubleRedeemed, unexpected].forEach((c) => c.add(0));
  const run = runId();
  const sku = `storm-${run}`;
  createSku(sku, {});
  importCodes(sku, uniqueCodes(CODES), `${run}-stock`);
  const codes = claimCodes(sku, CODES, `${run}-sold`, 10);
  return { run, sku, codes };
}

function wrong(i, what, res) {
  unexpected.add(1);
  console.warn(`code ${i}: ${what}: ${api.describe(res)} ${String(res.body).slice(0, 300)}`);
}

function isRedeemed(res) {
  return res.status === 200 && api.body(res).state === 'redeemed';
}

function isUsed(res) {
  return res.status === 409 && api.errorCode(res) === 'ERR_CARD_USED';
}

export default function (data) {
  const i = exec.scenario.iterationInTest;
  const code = data.codes[i];
  const sku = i % 2 === 0 ? data.sku : undefined;
  const holder = `holder-${data.run}-${i}`;
  const other = `other-${data.run}-${i}`;

  if (isRace(i)) {
    const raced = http.batch([
      api.redeemRequest(code, holder, sku),
      api.redeemRequest(code, other, sku),
    ]);
    // A shed or unanswered attempt is retried by the same redeemer: it replays its answer.
    const answers = raced.map((res, k) => (res.status === 503 || res.status === 0
      ? api.withRetry(() => api.redeem(code, k === 0 ? holder : other, sku)) : res));
    const winners = answers.filter(isRedeemed).length;
    const losers = answers.filter(isUsed).length;
    if (winners > 1) {
      doubleRedeemed.add(winners - 1);
      console.error(`code ${i} was redeemed by both racers`);
    }
    if (winners === 1 && losers === 1) {
      redeemed.add(1);
      used.add(1);
      redeemDuration.add(answers.find(isRedeemed).timings.duration);
    } else if (winners <= 1) {
      wrong(i, 'race', answers.find((r) => !isRedeemed(r) && !isUsed(r)) || answers[0]);
    }
    return;
  }

  const first = api.withRetry(() => api.redeem(code, holder, sku));
  if (!isRedeemed(first) || api.body(first).replayed !== false) {
    wrong(i, 'redemption', first);
    return;
  }
  redeemed.add(1);
  redeemDuration.add(first.timings.duration);
  if (!isReuse(i)) return;

  const second = api.withRetry(() => api.redeem(code, other, sku));
  if (isRedeemed(second)) {
    doubleRedeemed.add(1);
    console.error(`code ${i} was redeemed again by another redeemer`);
  } else if (isUsed(second)) {
    used.add(1);
  } else {
    wrong(i, 'second redemption', second);
  }
  const again = api.withRetry(() => api.redeem(code, holder, sku));
  if (isRedeemed(again) && api.body(again).replayed === true) replays.add(1);
  else wrong(i, 'redemption retried by its holder', again);
}

export function teardown(data) {
  const view = settle(data.sku, 60000);
  expectCounts(data.sku, view, { redeemed: CODES }, CODES);
}

export const handleSummary = summaryHandler('redemption_storm');
