-- claims_batch.lua — claim codes for several orders of one SKU in one call.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 now (ms), then per order 6 values: order id, quantity (>= 1), user id ('' = none),
--       hold ms ('0' = final claim), channel (its pool), '1' if it may draw from the shared
--       remainder
-- Reply: one claim.lua reply per order, in order (each order idempotent on its own, exactly
--        as if claimed alone; {'moved'} too, then the gateway claims that order alone)
--      | {'no_sku'} | {'loading'}
-- One call for many orders: the engine round trip, script start and hold sweep are paid
-- once, not per order.

local now = tonumber(ARGV[1])

local refused = unservable()
if refused then return refused end
-- Counts and settled entries are written once for all orders (see DEFERRED), also when a
-- command fails on the way.
defer()
local ok, replies = pcall(function()
  expire_due(now, 100)
  local replies = {}
  for i = 2, #ARGV, 6 do
    replies[#replies + 1] = claim_order(ARGV[i], num(ARGV[i + 1]), ARGV[i + 2],
      num(ARGV[i + 3]), now, ARGV[i + 4], ARGV[i + 5] == '1')
  end
  return replies
end)
flush()
if not ok then error(replies, 0) end
return replies
