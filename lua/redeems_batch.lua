-- redeems_batch.lua — several redemptions of one SKU in one call.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 now (ms), then per redemption: redeemer, '1' while redemptions are paused ('0'
--       otherwise), n (>= 1), and n digests, one per candidate form of the code, the newest
--       format version first
-- Reply: one redeem.lua reply per redemption, in order (each exactly as if redeemed alone,
--        after the ones before it: a code asked twice in one call is redeemed once)
--      | {'no_sku'} | {'loading'}
-- One call for many redemptions: the engine round trip and script start are paid once. As in
-- redeem.lua, the codes are looked up before the SKU is known to serve, so a batch of decoys
-- (src/inventory, redeem_unknown) costs what the lookups cost.

local now = tonumber(ARGV[1])

local replies, refused, i = {}, nil, 2
while i <= #ARGV do
  local redeemer, paused, n = ARGV[i], ARGV[i + 1] == '1', tonumber(ARGV[i + 2])
  local last = i + 2 + n
  local id, k, matched = find_sold(ARGV, i + 3, last)
  if i == 2 then refused = unservable() end
  if not refused then
    replies[#replies + 1] = redeem_found(id, k, matched, redeemer, now, paused)
  end
  i = last + 1
end
if refused then return refused end
return replies
