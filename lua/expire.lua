-- expire.lua — lapse holds that are due, for the periodic sweep.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 now (ms), 2 most holds to lapse in this call (keeps each call short)
-- Reply: {lapsed, more} — more = 1 when further holds are already due.

local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
-- While a rebuild loads keys and orders, lapsing a hold would unhold keys not loaded yet.
if unservable() then return { 0, 0 } end
local lapsed = expire_due(now, limit)
local more = redis.call('ZRANGEBYSCORE', K.holds, '-inf', now, 'LIMIT', 0, 1)
return { lapsed, #more }
