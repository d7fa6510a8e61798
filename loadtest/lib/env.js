// Where the gateway is and how to talk to it, read once from the environment, and the
// identifiers that keep one run's SKU and orders apart from every other run's.

import { randomBytes } from 'k6/crypto';

function required(name) {
  const value = __ENV[name];
  if (!value) {
    throw new Error(`${name} is not set ` +
      '(BASE_URL, ADMIN_URL, MERCHANT_TOKEN and ADMIN_TOKEN are required)');
  }
  return value.replace(/\/+$/, '');
}

export const BASE_URL = required('BASE_URL');
export const ADMIN_URL = required('ADMIN_URL');
export const MERCHANT_TOKEN = required('MERCHANT_TOKEN');
export const ADMIN_TOKEN = required('ADMIN_TOKEN');

/** An integer from the environment, or `fallback`. */
export function intEnv(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name}=${raw} is not a non-negative integer`);
  }
  return value;
}

/** A string from the environment, or `fallback`. */
export function strEnv(name, fallback) {
  const raw = __ENV[name];
  return raw === undefined || raw === '' ? fallback : raw;
}

const CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';

/**
 * `length` random characters of the Crockford base-32 alphabet: valid under both the
 * default format and the `crockford32` preset, and 5 bits of entropy each.
 */
export function randomCrockford(length) {
  const bytes = new Uint8Array(randomBytes(length));
  let out = '';
  for (let i = 0; i < length; i++) out += CROCKFORD[bytes[i] & 31];
  return out;
}

/**
 * A name for this run, unique across runs against the same gateway: the time in base 36
 * and random characters. Goes into SKU names (at most 64 characters) and order ids.
 */
export function runId() {
  return `${Date.now().toString(36)}${randomCrockford(6).toLowerCase()}`;
}

/**
 * `count` codes unique to this run: a run-specific prefix keeps them apart from other runs'
 * codes, a counter keeps them apart from each other, and random characters make them
 * unguessable. Upper case, because the gateway normalises to upper case.
 */
export function uniqueCodes(count, length = 20) {
  const prefix = randomCrockford(8);
  const codes = new Array(count);
  const pad = Math.max(6, String(count).length);
  for (let i = 0; i < count; i++) {
    const n = String(i).padStart(pad, '0');
    codes[i] = `${prefix}${n}${randomCrockford(Math.max(4, length - prefix.length - pad))}`;
  }
  return codes;
}
