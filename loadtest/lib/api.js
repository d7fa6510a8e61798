// The gateway's HTTP API as the scenarios use it. Every request carries a `name` tag with
// the route pattern, never the raw path, so k6's own metrics stay per route.
//
// Retried calls resend the same order id or the same redemption: the gateway answers a
// retry with the first answer (invariant 2), so retrying a 503 or a shed request is safe.

import http from 'k6/http';
import { sleep } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, ADMIN_URL, MERCHANT_TOKEN, ADMIN_TOKEN } from './env.js';

/** Requests sent again after a 503, a rate-limit answer or a network error. */
export const retries = new Counter('retries');

const merchantHeaders = {
  Authorization: `Bearer ${MERCHANT_TOKEN}`,
  'Content-Type': 'application/json',
};
const adminHeaders = {
  Authorization: `Bearer ${ADMIN_TOKEN}`,
  'Content-Type': 'application/json',
};
const publicHeaders = { 'Content-Type': 'application/json' };

const enc = encodeURIComponent;

/** The `error.code` of an error envelope, `''` for any other body. */
export function errorCode(res) {
  if (!res || !res.body || res.status < 400) return '';
  try {
    const code = res.json('error.code');
    return typeof code === 'string' ? code : '';
  } catch (_) {
    return '';
  }
}

/** The parsed JSON body, or null when the body is not JSON. */
export function body(res) {
  try {
    return res.json();
  } catch (_) {
    return null;
  }
}

/** `status code` of an answer, for messages: `409 ERR_SOLD_OUT`, `0 (network error)`. */
export function describe(res) {
  if (!res) return 'no answer';
  if (res.status === 0) return `0 (${res.error || 'network error'})`;
  const code = errorCode(res);
  return code ? `${res.status} ${code}` : `${res.status}`;
}

/** Whether an answer says "try the same request again later". */
function retryable(res) {
  if (res.status === 0 || res.status === 503) return true;
  return res.status === 429 && errorCode(res) === 'ERR_RATE_LIMITED';
}

function retryAfterSeconds(res) {
  const header = Number(res.headers['Retry-After']);
  const fromHeader = Number.isFinite(header) && header > 0 ? header : 0.05;
  return Math.min(fromHeader, 1);
}

/**
 * Sends `send()` until its answer is not retryable or `deadlineMs` passed, and returns the
 * last answer. Waits as `Retry-After` says, at most a second at a time.
 */
export function withRetry(send, deadlineMs = 30000) {
  const end = Date.now() + deadlineMs;
  let res = send();
  while (retryable(res) && Date.now() < end) {
    retries.add(1);
    sleep(retryAfterSeconds(res));
    res = send();
  }
  return res;
}

function params(headers, name, extra) {
  return Object.assign({ headers, tags: { name } }, extra || {});
}

// --- admin listener -------------------------------------------------------------------

/** `PUT /v1/skus/{sku}` with `settings`. */
export function putSku(sku, settings = {}) {
  return http.put(`${ADMIN_URL}/v1/skus/${enc(sku)}`, JSON.stringify(settings),
    params(adminHeaders, 'PUT /v1/skus/{sku}'));
}

/** `POST /v1/skus/{sku}/batches`: `codes` as text/plain, a code per line. */
export function importBatch(sku, batchId, codes, activate = true) {
  const url = `${ADMIN_URL}/v1/skus/${enc(sku)}/batches?batch_id=${enc(batchId)}` +
    (activate ? '' : '&activate=false');
  return http.post(url, codes.join('\n') + '\n', params(
    { Authorization: adminHeaders.Authorization, 'Content-Type': 'text/plain' },
    'POST /v1/skus/{sku}/batches', { timeout: '600s' }));
}

export function activateBatch(sku, batchId) {
  return http.post(`${ADMIN_URL}/v1/skus/${enc(sku)}/batches/${enc(batchId)}/activate`, null,
    params(adminHeaders, 'POST /v1/skus/{sku}/batches/{batch_id}/activate'));
}

export function warm(sku) {
  return http.post(`${ADMIN_URL}/v1/skus/${enc(sku)}/warm`, null,
    params(adminHeaders, 'POST /v1/skus/{sku}/warm'));
}

export function retireFormat(sku, version, reason, force = false) {
  return http.post(`${ADMIN_URL}/v1/skus/${enc(sku)}/formats/${version}/retire`,
    JSON.stringify({ reason, force }),
    params(adminHeaders, 'POST /v1/skus/{sku}/formats/{version}/retire'));
}

export function voidKey(keyId, reason) {
  return http.post(`${ADMIN_URL}/v1/keys/${enc(keyId)}/void`, JSON.stringify({ reason }),
    params(adminHeaders, 'POST /v1/keys/{key_id}/void'));
}

export function restoreKey(keyId, reason) {
  return http.post(`${ADMIN_URL}/v1/keys/${enc(keyId)}/restore`, JSON.stringify({ reason }),
    params(adminHeaders, 'POST /v1/keys/{key_id}/restore'));
}

export function keyEvents(keyId) {
  return http.get(`${ADMIN_URL}/v1/keys/${enc(keyId)}/events`,
    params(adminHeaders, 'GET /v1/keys/{key_id}/events'));
}

export function reconcile(sku, repair = false) {
  return http.post(`${ADMIN_URL}/v1/reconcile`, JSON.stringify({ sku, repair }),
    params(adminHeaders, 'POST /v1/reconcile'));
}

export function adminSkuView(sku) {
  return http.get(`${ADMIN_URL}/v1/skus/${enc(sku)}`, params(adminHeaders, 'GET /v1/skus/{sku}'));
}

/** `/healthz`, `/readyz` or `/metrics`: no token. */
export function probe(path) {
  return http.get(`${ADMIN_URL}${path}`, { tags: { name: `GET ${path}` } });
}

// --- merchant routes (public listener, merchant token) ---------------------------------

export function skuView(sku) {
  return http.get(`${BASE_URL}/v1/skus/${enc(sku)}`, params(merchantHeaders, 'GET /v1/skus/{sku}'));
}

/** `POST /v1/skus/{sku}/claims` with `claim` (`order_id`, `quantity`, `user_id`, `hold_ms`). */
export function claim(sku, claimBody) {
  return http.post(`${BASE_URL}/v1/skus/${enc(sku)}/claims`, JSON.stringify(claimBody),
    params(merchantHeaders, 'POST /v1/skus/{sku}/claims'));
}

export function claimBatch(sku, claims) {
  return http.post(`${BASE_URL}/v1/skus/${enc(sku)}/claims/batch`, JSON.stringify({ claims }),
    params(merchantHeaders, 'POST /v1/skus/{sku}/claims/batch', { timeout: '120s' }));
}

export function order(sku, orderId) {
  return http.get(`${BASE_URL}/v1/skus/${enc(sku)}/claims/${enc(orderId)}`,
    params(merchantHeaders, 'GET /v1/skus/{sku}/claims/{order_id}'));
}

/** Requests to read orders back, for `http.batch`. */
export function orderRequests(sku, orderIds) {
  return orderIds.map((id) => ({
    method: 'GET',
    url: `${BASE_URL}/v1/skus/${enc(sku)}/claims/${enc(id)}`,
    params: params(merchantHeaders, 'GET /v1/skus/{sku}/claims/{order_id}'),
  }));
}

export function confirm(sku, orderId) {
  return http.post(`${BASE_URL}/v1/skus/${enc(sku)}/claims/${enc(orderId)}/confirm`, null,
    params(merchantHeaders, 'POST /v1/skus/{sku}/claims/{order_id}/confirm'));
}

export function release(sku, orderId) {
  return http.post(`${BASE_URL}/v1/skus/${enc(sku)}/claims/${enc(orderId)}/release`, null,
    params(merchantHeaders, 'POST /v1/skus/{sku}/claims/{order_id}/release'));
}

// --- public route ----------------------------------------------------------------------

/** `POST /v1/redeem`; `sku` may be omitted (the global index finds the code). */
export function redeem(code, redeemer, sku) {
  const payload = sku ? { code, redeemer, sku } : { code, redeemer };
  return http.post(`${BASE_URL}/v1/redeem`, JSON.stringify(payload),
    params(publicHeaders, 'POST /v1/redeem'));
}

/** A redemption as a request for `http.batch`, to race several at once. */
export function redeemRequest(code, redeemer, sku) {
  const payload = sku ? { code, redeemer, sku } : { code, redeemer };
  return {
    method: 'POST',
    url: `${BASE_URL}/v1/redeem`,
    body: JSON.stringify(payload),
    params: params(publicHeaders, 'POST /v1/redeem'),
  };
}

/** A raw request to the public listener, for error paths (bad bodies, wrong methods). */
export function rawPublic(method, path, payload, headers, name) {
  return http.request(method, `${BASE_URL}${path}`, payload,
    params(Object.assign({}, headers || {}), name || `${method} ${path}`));
}

/** A raw request to the admin listener. */
export function rawAdmin(method, path, payload, headers, name) {
  return http.request(method, `${ADMIN_URL}${path}`, payload,
    params(Object.assign({}, headers || {}), name || `${method} ${path}`));
}

export { merchantHeaders, adminHeaders };
