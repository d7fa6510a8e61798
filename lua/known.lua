-- known.lua — whether the engine has order ARGV[1]: the edge's read that tells a retried
-- order from a new one before answering without a claim (a SKU remembered sold out, a
-- pause). A SKU the engine lacks or is rebuilding answers so, never 'not_found': its orders
-- may not be loaded yet, and an order the engine lost is not a new order.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 order id
-- Reply: {'found'} | {'not_found'} | {'moved'} (see claim.lua) | {'no_sku'} | {'loading'}

local refused = unservable()
if refused then return refused end
if redis.call('HEXISTS', K.orders, ARGV[1]) == 1 then return { 'found' } end
return unknown_order(ARGV[1])
