-- restore.lua — undo a void of key ARGV[1]: it returns to the state its orders give it.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 key id, 2 reason, 3 now (ms)
-- Reply: {'new', state after, event (see EMITTED), answer id} | {'replay', state} (was not void) | {'not_found'} | {'no_sku'} | {'loading'}

local id, reason, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local refused = unservable()
if refused then return refused end
local k = load_key(id)
if not k then return { 'not_found' } end
if not k.void then return { 'replay', key_state(k) } end
local before = snapshot(k)
k.void = false
save_key(id, before, k)
local state = key_state(k)
local eid = emit('restore', now, { 'ids', id, 'reason', reason, 'after', state })
return { 'new', state, EMITTED, eid }
