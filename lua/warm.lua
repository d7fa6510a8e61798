-- warm.lua — load keys from the ledger into the engine, each in the state the ledger has.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 the SKU generation this load is for ('' = any), then per key 12 values: key id,
--       digest, canonical code, expires_at ('0' = never), max_issues, max_uses, held, sold,
--       uses, void ('1'|'0'), redeemer, redeemed_at
-- Reply: one entry per key: its id if loaded, or '=' .. the id already holding that digest
--        (nothing changes for it) | {'no_sku'} | {'stale'} (the SKU is another generation:
--        it was lost and recreated since this rebuild began, and that rebuild loads it)
-- Used for new batches and to rebuild an engine that lost its data. Chunks stay small (a
-- few hundred keys) so no call blocks the engine for long.

if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
if ARGV[1] ~= '' and (redis.call('HGET', K.meta, 'gen') or '') ~= ARGV[1] then
  return { 'stale' }
end

local reply = {}
for i = 2, #ARGV, 12 do
  local id, digest, code = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local existing = redis.call('HGET', K.idx, digest)
  -- An index entry whose record is gone (partial loss) does not count: load the key again.
  if existing and redis.call('HEXISTS', K.keys, existing) == 1 then
    reply[#reply + 1] = '=' .. existing
  else
    local k = {
      expires_at = tonumber(ARGV[i + 3]), max_issues = tonumber(ARGV[i + 4]),
      max_uses = tonumber(ARGV[i + 5]), held = tonumber(ARGV[i + 6]),
      sold = tonumber(ARGV[i + 7]), uses = tonumber(ARGV[i + 8]), void = ARGV[i + 9] == '1',
      redeemer = ARGV[i + 10], redeemed_at = tonumber(ARGV[i + 11]),
    }
    if tonumber(id) > tonumber(redis.call('HGET', K.meta, 'seq') or '0') then
      redis.call('HSET', K.meta, 'seq', id)
    end
    redis.call('HSET', K.idx, digest, id)
    redis.call('HSET', K.codes, id, code)
    save_key(id, snapshot(nil), k)
    reply[#reply + 1] = id
  end
end
-- No event: warming restores what the ledger already records; it changes nothing there.
return reply
