-- claim.lua — issue ARGV[2] codes of a SKU to order ARGV[1], finally or as an expiring hold.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 order id, 2 quantity (>= 1), 3 user id ('' = none), 4 hold ms ('0' = final claim),
--       5 now (ms), 6 the claiming channel (its pool), 7 '1' if it may draw from the
--       shared remainder once its pool is empty ('0': its pool only)
--       8 '1' when the ledger has no order of this id though its fingerprint says it may have
--       been retired (another order's fingerprint): claim it as new
-- Reply: {'new'|'replay', state, expires_at, late, event id, event, id, code, ...}
--        (see order_reply)
--      | {'sold_out', issuable} (issuable: keys there were, fewer than asked, or the codes
--        available to anyone when the channel's pool and share cannot cover it; 0 = none)
--      | {'conflict'} | {'user_limit', current, limit} | {'no_sku'} | {'loading'}
--      | {'moved'} (the order may have been retired: restore it from the ledger and ask again)
-- A retried order gets its first answer again, also after the SKU sold out; the same order id
-- with other parameters is a conflict, never a second claim.

local order_id, qty, user = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local hold_ms, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local pool, share = ARGV[6], ARGV[7] == '1'

local refused = unservable()
if refused then return refused end
-- Counts and settled entries are written once at the end (see DEFERRED), also when a
-- command fails on the way.
defer()
local ok, reply = pcall(function()
  expire_due(now, 100)
  return claim_order(order_id, qty, user, hold_ms, now, pool, share, ARGV[8] == '1')
end)
flush()
if not ok then error(reply, 0) end
return reply
