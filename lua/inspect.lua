-- inspect.lua — read key records, for reconciliation with the ledger.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: key ids
-- Reply: one entry per id: {void, held, sold, uses, redeemer, redeemed_at} as strings, or
--        an empty array when the engine has no such key

local reply = {}
for i = 1, #ARGV do
  local k = load_key(ARGV[i])
  if k then
    reply[i] = {
      k.void and '1' or '0', tostring(k.held), tostring(k.sold), tostring(k.uses), k.redeemer,
      tostring(k.redeemed_at),
    }
  else
    reply[i] = {}
  end
end
return reply
