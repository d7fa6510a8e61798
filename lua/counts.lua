-- counts.lua — how many of a SKU's keys are in each state.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: none
-- Reply: {available, held, claimed, redeemed, void} | {'no_sku'} | {'loading'}

local refused = unservable()
if refused then return refused end
local c = redis.call('HMGET', K.counts, 'available', 'held', 'claimed', 'redeemed', 'void')
for i = 1, 5 do c[i] = tonumber(c[i] or '0') end
return c
