-- repair.lua — set keys to the state the ledger records (reconcile --repair).
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: per key 7 values: key id, void ('1'|'0'), held, sold, uses, redeemer, redeemed_at
-- Reply: number of keys changed
-- Only called for keys where the ledger is ahead of the engine (the engine lost a change
-- the ledger has); a change only the engine has is never rolled back. Counts and the
-- available list follow through save_key.

local changed = 0
for i = 1, #ARGV, 7 do
  local id = ARGV[i]
  local k = load_key(id)
  if k then
    local before = snapshot(k)
    k.void = ARGV[i + 1] == '1'
    k.held, k.sold, k.uses = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    k.redeemer, k.redeemed_at = ARGV[i + 5], tonumber(ARGV[i + 6])
    save_key(id, before, k)
    changed = changed + 1
  end
end
-- No event: the engine is brought to what the ledger already records.
return changed
