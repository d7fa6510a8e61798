-- void.lua — take key ARGV[1] out of circulation: it can be neither issued nor redeemed.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 key id, 2 reason, 3 now (ms)
-- Reply: {'new', state before, event (see EMITTED), answer id} | {'replay'} (already void) | {'not_found'} | {'no_sku'} | {'loading'}
-- Orders keep their record of the key; the key just stops counting as sold.

local id, reason, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local refused = unservable()
if refused then return refused end
local k = load_key(id)
if not k then return { 'not_found' } end
if k.void then return { 'replay' } end
local before = snapshot(k)
k.void = true
save_key(id, before, k)
local eid = emit('void', now, { 'ids', id, 'reason', reason, 'before', before })
local answer = EMITTED
-- An available code may have been reserved by a pool: the pools never promise more than
-- is available.
if before == 'available' then fit_pools(now, 'void') end
return { 'new', before, answer, eid }
