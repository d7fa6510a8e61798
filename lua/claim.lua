-- claim.lua — issue ARGV[2] codes of a SKU to order ARGV[1], finally or as an expiring hold.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 order id, 2 quantity (>= 1), 3 user id ('' = none), 4 hold ms ('0' = final claim),
--       5 now (ms)
-- Reply: {'new'|'replay', state, expires_at, late, event id, event, id, code, ...}
--        (see order_reply)
--      | {'sold_out', issuable} (issuable: keys there were, fewer than asked; 0 = none)
--      | {'conflict'} | {'user_limit', current, limit} | {'no_sku'} | {'loading'}
-- A retried order gets its first answer again, also after the SKU sold out; the same order id
-- with other parameters is a conflict, never a second claim.

local order_id, qty, user = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local hold_ms, now = tonumber(ARGV[4]), tonumber(ARGV[5])

local refused = unservable()
if refused then return refused end
expire_due(now, 100)

local existing = decode_order(redis.call('HGET', K.orders, order_id))
if existing then
  if existing.qty ~= qty or existing.user ~= user or existing.hold_ms ~= hold_ms then
    return { 'conflict' }
  end
  return order_reply('replay', existing)
end

local limited = check_user_limit(user, qty)
if limited then return limited end

local ids, issuable_left = take(qty, now)
if not ids then return { 'sold_out', issuable_left } end
local held = hold_ms > 0
issue(ids, held)
add_user_codes(user, qty)

local o = {
  state = held and 'held' or 'claimed', qty = qty, user = user, hold_ms = hold_ms,
  expires_at = held and (now + hold_ms) or 0, late = false, created_at = now,
  updated_at = now, ids = ids,
}
o.eid = emit(held and 'hold' or 'claim', now, {
  'order', order_id, 'user', user, 'ids', table.concat(ids, ','), 'expires_at', o.expires_at,
  'hold_ms', hold_ms, 'qty', qty,
})
save_order(order_id, o)
if held then redis.call('ZADD', K.holds, o.expires_at, order_id) end
return order_reply('new', o)
