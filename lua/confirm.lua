-- confirm.lua — payment arrived for held order ARGV[1]: its hold becomes a final claim.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 order id, 2 now (ms), 3 '1' if a late confirm may draw from the shared remainder
--       once the order's channel pool is empty
-- Reply: {'new'|'replay', state, expires_at, late, event id, event, id, code, ...}
--        (see order_reply; a late confirm's event is a list, see EMITTED)
--      | {'not_found'} | {'moved'} (see claim.lua) | {'hold_expired'} | {'sold_out', issuable}
--      | {'user_limit', current, limit} | {'no_sku'} | {'loading'}
-- After the hold lapsed, fresh codes are claimed if any remain (late = 1), unless the SKU
-- disallows late confirms (hold_expired). A released order cannot be confirmed.

local order_id, now, share = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'

local refused = unservable()
if refused then return refused end
expire_due(now, 100)
local o = current_order(order_id, now)
if not o then return unknown_order(order_id) end

if o.state == 'claimed' then return order_reply('replay', o) end
if o.state == 'released' then return { 'hold_expired' } end

if o.state == 'held' then
  for _, id in ipairs(o.ids) do
    local k = load_key(id)
    local before = snapshot(k)
    k.held = math.max(k.held - 1, 0)
    k.sold = k.sold + 1
    save_key(id, before, k)
  end
  redis.call('ZREM', K.holds, order_id)
  o.state = 'claimed'
  o.updated_at = now
  o.eid = emit('confirm', now, {
    'order', order_id, 'user', o.user, 'ids', table.concat(o.ids, ','),
  })
  save_order(order_id, o)
  return order_reply('new', o)
end

-- The hold lapsed: the late path.
if redis.call('HGET', K.meta, 'allow_late') == '0' then return { 'hold_expired' } end
-- Fresh codes presume the hold's went back. The lapse (this call's or the sweep's) may be
-- only in the stream still: it goes with the answer, so an engine that loses both before
-- the ledger has them is rebuilt with the hold's codes back, not held by a claimed order.
local lapse = stream_entry(o.eid)
local limited = check_user_limit(o.user, o.qty)
if limited then return limited end
-- Fresh codes, drawn as a claim of the order's channel would draw them.
local pooled, available = draw(o.pool, o.qty, share)
if not pooled then return { 'sold_out', available } end
local ids, issuable_left, recs, retired = take(o.qty, now)
if not ids then
  if retired > 0 then fit_pools(now, 'expired') end
  return { 'sold_out', issuable_left }
end
issue(ids, false, recs)
add_user_codes(o.user, o.qty)
add_to_pool(o.pool, -pooled)
if retired > 0 then fit_pools(now, 'expired') end
o.state, o.late, o.ids, o.updated_at, o.pooled = 'claimed', true, ids, now, pooled
local fields = {
  'order', order_id, 'user', o.user, 'ids', table.concat(ids, ','), 'late', 1,
  'pool', o.pool, 'pooled', pooled,
}
-- Named so that a replay of this answer, which only has the confirm's entry, keeps the
-- lapse too while the stream has it (stream.lua 'entry').
if lapse then
  fields[#fields + 1] = 'lapse'
  fields[#fields + 1] = lapse[1]
end
o.eid = emit('confirm', now, fields)
if lapse then EMITTED = { lapse, EMITTED } end
save_order(order_id, o)
return order_reply('new', o)
