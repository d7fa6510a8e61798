-- redeem.lua — redeem the code with digest ARGV[1] for redeemer ARGV[2].
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 code digest, 2 redeemer, 3 now (ms)
-- Reply: {'new'|'replay', key id, redeemed_at, event id, event (see EMITTED; empty for a
--        replay)}
--      | {'invalid'} | {'used', redeemed_at, redeemer} | {'expired', expires_at}
--      | {'no_sku'} | {'loading'}
-- Only a sold code can be redeemed: unknown, unsold (available or held) and voided codes all
-- get the same {'invalid'}, so guessing cannot tell them apart. The same redeemer again gets
-- its first answer; a code's uses are capped by its max_uses.

local digest, redeemer, now = ARGV[1], ARGV[2], tonumber(ARGV[3])

-- The index first: a decoy call for an unknown code (src/inventory, redeem_unknown) runs
-- against a SKU that does not exist and must cost what a real lookup costs.
local id = redis.call('HGET', K.idx, digest)
local refused = unservable()
if refused then return refused end
if not id then return { 'invalid' } end
local k = load_key(id)
if not k or k.void or k.sold == 0 then return { 'invalid' } end
if k.expires_at > 0 and now >= k.expires_at then return { 'expired', k.expires_at } end

local mark = id .. '|' .. redeemer
local previous = redis.call('HGET', K.redemptions, mark)
if previous then
  local at, eid = string.match(previous, '^(%d+)|?(.*)$')
  return { 'replay', id, at, eid, {} }
end
if k.uses >= k.max_uses then
  -- The last redeemer asking again, after the redemption marks were lost with the engine's
  -- data (the key itself comes back from the ledger): the same answer as the first time.
  if k.redeemer == redeemer then return { 'replay', id, tostring(k.redeemed_at), '', {} } end
  return { 'used', k.redeemed_at, k.redeemer }
end

local before = snapshot(k)
k.uses = k.uses + 1
k.redeemer = redeemer
k.redeemed_at = now
save_key(id, before, k)
local eid = emit('redeem', now, { 'ids', id, 'redeemer', redeemer, 'uses', k.uses })
redis.call('HSET', K.redemptions, mark, now .. '|' .. eid)
return { 'new', id, now, eid, EMITTED }
