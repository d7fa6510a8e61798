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

-- The index first: a decoy call for an unknown code (src/inventory, redeem_unknown) runs
-- against a SKU that does not exist and must cost what a lookup costs.
local id, k, matched = find_sold(ARGV, 4, #ARGV)
local refused = unservable()
if refused then return refused end
return redeem_found(id, k, matched, redeemer, now, paused)
