-- order.lua — read order ARGV[1], lapsing its hold first if it is due.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 order id, 2 now (ms)
-- Reply: {'found', state, expires_at, late, event id, event, id, code, ...} (see order_reply)
--      | {'not_found'} | {'moved'} (see claim.lua) | {'no_sku'} | {'loading'}

local order_id, now = ARGV[1], tonumber(ARGV[2])
local refused = unservable()
if refused then return refused end
local o = current_order(order_id, now)
if not o then return unknown_order(order_id) end
return order_reply('found', o)
