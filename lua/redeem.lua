-- redeem.lua — redeem, for redeemer ARGV[1], the code whose canonical form under one of the
-- SKU's format versions has one of the digests ARGV[4..].
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 redeemer, 2 now (ms), 3 '1' while redemptions are paused ('0' otherwise),
--       4.. one digest per candidate form of the code, the newest format version first
-- Reply: {'new'|'replay', key id, redeemed_at, event id, event ({stream id, uses}, see
--        EMITTED; empty for a replay), n (which candidate matched, from 1)}
--      | {'invalid'} | {'used', redeemed_at, redeemer} | {'expired', expires_at}
--      | {'paused'} | {'no_sku'} | {'loading'}
-- Only a sold code can be redeemed: unknown, unsold (available or held) and voided codes all
-- get the same {'invalid'}, so guessing cannot tell them apart. The same redeemer again gets
-- its first answer; a code's uses are capped by its max_uses. A code that reads as different
-- codes under different format versions redeems the one that was sold. While redemptions are
-- paused every answer is the same except that no new redemption is made: {'paused'} instead,
-- so a retry still gets its first answer and a pause reveals nothing a normal answer would not.

local redeemer, now, paused = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'

-- Every candidate is looked up, whichever matches: the work does not tell which version a
-- code belongs to. The index first: a decoy call for an unknown code (src/inventory,
-- redeem_unknown) runs against a SKU that does not exist and must cost what a lookup costs.
local id, k, matched = nil, nil, 0
for i = 4, #ARGV do
  local found = redis.call('HGET', K.idx, ARGV[i])
  if found and not id then
    local key = load_key(found)
    if key and not key.void and key.sold > 0 then id, k, matched = found, key, i - 3 end
  end
end
local refused = unservable()
if refused then return refused end
if not id then return { 'invalid' } end
if k.expires_at > 0 and now >= k.expires_at then return { 'expired', k.expires_at } end

local mark = id .. '|' .. redeemer
local previous = redis.call('HGET', K.redemptions, mark)
if previous then
  local at, eid = string.match(previous, '^(%d+)|?(.*)$')
  return { 'replay', id, at, eid, {}, matched }
end
if k.uses >= k.max_uses then
  -- The last redeemer asking again, after the redemption marks were lost with the engine's
  -- data (the key itself comes back from the ledger): the same answer as the first time.
  if k.redeemer == redeemer then
    return { 'replay', id, tostring(k.redeemed_at), '', {}, matched }
  end
  return { 'used', k.redeemed_at, k.redeemer }
end

if paused then return { 'paused' } end

local before = snapshot(k)
k.uses = k.uses + 1
k.redeemer = redeemer
k.redeemed_at = now
save_key(id, before, k)
-- Reported in short, {stream id, uses}: the gateway rebuilds the other fields, which it sent
-- or this reply carries (see EMITTED).
local eid, sid = append('redeem', now, { 'ids', id, 'redeemer', redeemer, 'uses', k.uses })
redis.call('HSET', K.redemptions, mark, int(now) .. '|' .. eid)
-- The code's last use: its record now answers this redeemer's retry as the mark does (see
-- the replay above), so the mark may retire (retire.lua). Marks of earlier uses of a
-- reusable code stay: only they tell those redeemers' retries from new redemptions.
if k.uses >= k.max_uses then
  redis.call('RPUSH', K.settled, int(now) .. '|' .. mark)
end
return { 'new', id, now, eid, { sid, int(k.uses) }, matched }
