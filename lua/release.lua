-- release.lua — cancel held order ARGV[1]: its codes go back to inventory at once.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 order id, 2 now (ms)
-- Reply: {'new'|'replay', state, expires_at, late, event id, event, id, '', ...}
--        (see order_reply)
--      | {'not_found'} | {'moved'} (see claim.lua)
--      | {'conflict'} (a final claim: its codes were delivered)
--      | {'no_sku'} | {'loading'}
-- Releasing an order that already lapsed or was released answers its state again.

local order_id, now = ARGV[1], tonumber(ARGV[2])

local refused = unservable()
if refused then return refused end
local o = current_order(order_id, now)
if not o then return unknown_order(order_id) end
if o.state == 'claimed' then return { 'conflict' } end
if o.state ~= 'held' then return order_reply('replay', o) end

local back = give_back(o, unhold(o.ids))
add_user_codes(o.user, -o.qty)
redis.call('ZREM', K.holds, order_id)
o.state = 'released'
o.updated_at = now
o.eid = emit('release', now, {
  'order', order_id, 'user', o.user, 'ids', table.concat(o.ids, ','), 'pool', o.pool,
  'pooled', back,
})
save_order(order_id, o)
return order_reply('new', o)
