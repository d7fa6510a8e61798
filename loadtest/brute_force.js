// brute_force — guessing codes from a few addresses while real holders redeem theirs from
// another. The gateway keys its public rate limit and its failed-redemption lockout per
// client address, so the run needs several source addresses: k6 `--local-ips`, e.g.
// `--local-ips 127.0.0.2-127.0.0.5` (loadtest/run passes that by default). The last
// address of the pool is the legitimate one; the others attack.
//
// k6 gives virtual user n the address (n - 1) modulo the pool size, so with ADDRESSES
// addresses (default 4, must match the pool) and PER_ADDRESS users each (default 2), every
// user knows its role. Each runs ITERATIONS iterations (default 100):
//
//   attacker    ATTACK_BURST (default 5) redemptions of random well-formed codes (the SKU's
//               own format: 16 Crockford base-32 characters), half naming the SKU, half
//               through the global index, each by a fresh redeemer name, then a pause of
//               PAUSE_MS (default 100);
//   legitimate  one redemption of a code it holds, then the same pause (well under the
//               public limit of 50 requests/s per address).
//
// Expected, with the gateway's default limits (MAX_FAILURES=10 failed redemptions per
// window, per address):
//   - attackers redeem nothing (`attacker_redeemed` 0);
//   - every attacker is locked out (ERR_LOCKED_OUT) before it is done;
//   - an address gets at most MAX_FAILURES answers to its guesses, plus one per other user
//     of that address whose guess was already in flight;
//   - every legitimate redemption succeeds at the first try, none is limited or locked out.
// The run must end within the first lockout (60 s by default) for the bound to be exact.
//
// Teardown: the SKU holds exactly the legitimate codes, all redeemed, in the engine and
// the ledger, drift 0, nothing in flight.

import { sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import * as api from './lib/api.js';
import { intEnv, randomCrockford, runId } from './lib/env.js';
import { claimCodes, createSku, importCodes } from './lib/inventory.js';
import { expectCounts, settle, startInvariants } from './lib/invariants.js';
import { summaryHandler, TREND_STATS } from './lib/summary.js';

const ADDRESSES = intEnv('ADDRESSES', 4);
const PER_ADDRESS = intEnv('PER_ADDRESS', 2);
const ITERATIONS = intEnv('ITERATIONS', 100);
const ATTACK_BURST = intEnv('ATTACK_BURST', 5);
const PAUSE_MS = intEnv('PAUSE_MS', 100);
const MAX_FAILURES = intEnv('MAX_FAILURES', 10);
const P99_MS = intEnv('P99_MS', 1000);
const CODE_LENGTH = 16;

const ATTACKERS = ADDRESSES - 1;
const LEGIT_CODES = PER_ADDRESS * ITERATIONS;
const GUESS_BOUND = ATTACKERS * (MAX_FAILURES + PER_ADDRESS - 1);

const attackerRedeemed = new Counter('attacker_redeemed');
const guessesAnswered = new Counter('attacker_guesses_answered');
const lockedOut = new Counter('attacker_locked_out');
const rateLimited = new Counter('attacker_rate_limited');
const neverLocked = new Counter('attackers_never_locked_out');
const legitRedeemed = new Counter('legit_redeemed');
const legitRefused = new Counter('legit_refused');
const unexpected = new Counter('unexpected_answers');
const legitDuration = new Trend('legit_redeem_duration', true);

export const options = {
  scenarios: {
    brute_force: {
      executor: 'per-vu-iterations',
      vus: ADDRESSES * PER_ADDRESS,
      iterations: ITERATIONS,
      maxDuration: '5m',
    },
  },
  thresholds: {
    attacker_redeemed: ['count==0'],
    attackers_never_locked_out: ['count==0'],
    attacker_locked_out: ['count>0'],
    attacker_guesses_answered: [`count<=${GUESS_BOUND}`],
    legit_redeemed: [`count==${LEGIT_CODES}`],
    legit_refused: ['count==0'],
    unexpected_answers: ['count==0'],
    invariant_violations: ['count==0'],
    legit_redeem_duration: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
  setupTimeout: '5m',
  teardownTimeout: '5m',
};

function ipv4(text) {
  const parts = text.trim().split('.').map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) {
    throw new Error(`--local-ips: ${text} is not an IPv4 address`);
  }
  return ((parts[0] * 256 + parts[1]) * 256 + parts[2]) * 256 + parts[3];
}

function dotted(n) {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/** The addresses of k6's `--local-ips` pool, in the order k6 hands them to users. */
function localAddresses() {
  const raw = exec.test.options.localIPs;
  if (!raw) return [];
  const out = [];
  String(raw).split(',').forEach((entry) => {
    if (entry.includes('/')) {
      throw new Error('--local-ips: give addresses or ranges (a-b), not CIDR blocks');
    }
    const [from, to] = entry.split('-');
    const first = ipv4(from);
    const last = to === undefined ? first : ipv4(to);
    for (let n = first; n <= last; n++) out.push(dotted(n));
  });
  return out;
}

export function setup() {
  const pool = localAddresses();
  if (pool.length !== ADDRESSES) {
    throw new Error(`brute_force needs --local-ips with ADDRESSES=${ADDRESSES} addresses ` +
      `(the last one legitimate, the others attacking), got ${pool.length}: ` +
      `${exec.test.options.localIPs}`);
  }
  startInvariants();
  [attackerRedeemed, guessesAnswered, lockedOut, rateLimited, neverLocked, legitRedeemed,
    legitRefused, unexpected].forEach((c) => c.add(0));
  const run = runId();
  const sku = `brute-${run}`;
  const format = { preset: 'crockford32', min_length: CODE_LENGTH, max_length: CODE_LENGTH };
  createSku(sku, { format });
  const fresh = new Set();
  while (fresh.size < LEGIT_CODES) fresh.add(randomCrockford(CODE_LENGTH));
  importCodes(sku, [...fresh], `${run}-stock`);
  const codes = claimCodes(sku, LEGIT_CODES, `${run}-sold`, 10);
  return { run, sku, codes, pool };
}

let sawLockout = false;

function attack(data) {
  for (let k = 0; k < ATTACK_BURST; k++) {
    const guess = randomCrockford(CODE_LENGTH);
    const res = api.redeem(guess, `guess-${randomCrockford(10)}`, k % 2 === 0 ? data.sku : undefined);
    const code = api.errorCode(res);
    if (res.status === 200) {
      attackerRedeemed.add(1);
      console.error(`an attacker redeemed a guessed code: ${res.body}`);
    } else if (res.status === 404 && code === 'ERR_CARD_INVALID') {
      guessesAnswered.add(1);
    } else if (res.status === 429 && code === 'ERR_LOCKED_OUT') {
      lockedOut.add(1);
      sawLockout = true;
    } else if (res.status === 429 && code === 'ERR_RATE_LIMITED') {
      rateLimited.add(1);
    } else {
      unexpected.add(1);
      console.warn(`attacker guess: ${api.describe(res)}`);
    }
  }
  if (exec.vu.iterationInScenario === ITERATIONS - 1 && !sawLockout) {
    neverLocked.add(1);
    console.error(`attacker user ${exec.vu.idInInstance} was never locked out`);
  }
}

function redeemOwn(data, slot) {
  const index = slot + exec.vu.iterationInScenario * PER_ADDRESS;
  const code = data.codes[index];
  const redeemer = `holder-${data.run}-${index}`;
  let res = api.redeem(code, redeemer, index % 2 === 0 ? data.sku : undefined);
  // Only a shed request or a lost connection is retried: a limit or a lockout is exactly
  // what a legitimate holder must never meet here.
  const end = Date.now() + 30000;
  while ((res.status === 503 || res.status === 0) && Date.now() < end) {
    sleep(0.05);
    res = api.redeem(code, redeemer, index % 2 === 0 ? data.sku : undefined);
  }
  if (res.status === 200 && api.body(res).state === 'redeemed') {
    legitRedeemed.add(1);
    legitDuration.add(res.timings.duration);
  } else {
    legitRefused.add(1);
    console.error(`legitimate redemption ${index}: ${api.describe(res)}`);
  }
}

export default function (data) {
  const position = (exec.vu.idInInstance - 1) % data.pool.length;
  if (position === data.pool.length - 1) {
    redeemOwn(data, Math.floor((exec.vu.idInInstance - 1) / data.pool.length));
  } else {
    attack(data);
  }
  sleep(PAUSE_MS / 1000);
}

export function teardown(data) {
  const view = settle(data.sku, 60000);
  expectCounts(data.sku, view, { redeemed: LEGIT_CODES }, LEGIT_CODES);
}

export const handleSummary = summaryHandler('brute_force');
